"""The hybrid cache (MLA latents, attention K/V, conv and recurrent states) and its footprint accounting."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LinearState:
    """A linear block's fixed-size state: short-conv tails {name: [B, C, W-1]} and the recurrent state
    [B, H, K, V] (float32)."""

    conv: dict = field(default_factory=dict)
    recurrent: torch.Tensor | None = None

    def tensors(self):
        return [*self.conv.values(), *([self.recurrent] if self.recurrent is not None else [])]


@dataclass
class MLAState:
    """MLA keeps only the normalised latent [B, T, kv_lora_rank] and the shared RoPE key [B, T, qk_rope_head_dim]."""

    latent: torch.Tensor | None = None
    k_rope: torch.Tensor | None = None

    def append(self, latent, k_rope):
        if self.latent is None:
            self.latent, self.k_rope = latent, k_rope
        else:
            self.latent = torch.cat([self.latent, latent], dim=1)
            self.k_rope = torch.cat([self.k_rope, k_rope], dim=1)
        return self.latent, self.k_rope

    def tensors(self):
        return [t for t in (self.latent, self.k_rope) if t is not None]


@dataclass
class KVState:
    """Plain attention: keys and values [B, T, H_kv, D] (time-first like every op here)."""

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None

    def append(self, key, value):
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.key = torch.cat([self.key, key], dim=1)
            self.value = torch.cat([self.value, value], dim=1)
        return self.key, self.value

    def tensors(self):
        return [t for t in (self.key, self.value) if t is not None]


STATE_CLASSES = {"mla": MLAState, "attention": KVState, "gdn": LinearState, "mamba2": LinearState}


class HyloCache:
    """One state object per layer, chosen by `config.mixers`; `seq_length` counts the tokens already seen."""

    def __init__(self, config):
        self.mixers = list(config.mixers)
        self.layers = [STATE_CLASSES[m]() for m in self.mixers]
        self.seq_length = 0

    def __getitem__(self, idx):
        return self.layers[idx]

    def __len__(self):
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def nbytes(self) -> dict:
        """Bytes actually held: {"per_token": growing caches, "fixed": conv + recurrent states, "total"}."""
        grow = sum(t.numel() * t.element_size() for m, st in zip(self.mixers, self.layers)
                   if m in ("mla", "attention") for t in st.tensors())
        fixed = sum(t.numel() * t.element_size() for m, st in zip(self.mixers, self.layers)
                    if m in ("gdn", "mamba2") for t in st.tensors())
        return {"growing": grow, "fixed": fixed, "total": grow + fixed}

    def reorder_cache(self, beam_idx):
        for st in self.layers:
            for name, value in vars(st).items():
                if isinstance(value, torch.Tensor):
                    setattr(st, name, value.index_select(0, beam_idx.to(value.device)))
                elif isinstance(value, dict):
                    for k, t in value.items():
                        value[k] = t.index_select(0, beam_idx.to(t.device))


def _bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def cache_footprint(config, seq_len: int, batch_size: int = 1, dtype=torch.bfloat16) -> dict:
    """Predicted cache bytes after `seq_len` tokens, next to the base Transformer the config came from.

    growing: MLA latents + RoPE keys and kept attention K/V (per token); fixed: conv tails (in `dtype`) and
    recurrent states (float32) of the linear layers. The base keeps K and V for every layer and KV head.
    `kv_fraction` is the per-token ratio hybrid / base (method.md section 3's KV-cache fraction).
    """
    e = _bytes(dtype)
    per_token = fixed = 0
    for m in config.mixers:
        if m == "mla":
            per_token += (config.kv_lora_rank + config.qk_rope_head_dim) * e
        elif m == "attention":
            per_token += 2 * config.num_key_value_heads * config.head_dim * e
        elif m == "gdn":
            H, K, V = config.gdn_num_heads, config.gdn_head_dim, config.gdn_head_v_dim
            fixed += H * K * V * 4
            if config.gdn_use_short_conv:
                fixed += (2 * H * K + H * V) * (config.gdn_conv_size - 1) * e
        elif m == "mamba2":
            H, P, N = config.num_attention_heads, config.head_dim, config.mamba2_state_size
            d_xb = config.num_key_value_heads * config.head_dim
            fixed += H * N * P * 4 + (2 * d_xb + H * P) * (config.mamba2_conv_kernel - 1) * e
    base_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * e
    growing = per_token * seq_len * batch_size
    fixed *= batch_size
    base_total = base_per_token * seq_len * batch_size
    return {
        "seq_len": seq_len, "batch_size": batch_size, "dtype": str(dtype).replace("torch.", ""),
        "per_token_bytes": per_token, "growing_bytes": growing, "fixed_bytes": fixed, "total_bytes": growing + fixed,
        "base_per_token_bytes": base_per_token, "base_total_bytes": base_total,
        "kv_fraction": per_token / base_per_token, "total_ratio": (growing + fixed) / base_total if base_total else float("nan"),
    }
