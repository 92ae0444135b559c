"""The hybrid cache (MLA latents, attention K/V, conv and recurrent states) and its footprint accounting.

Two ways to hold MLA latents:
- growing (the default, what generate() uses): a buffer that doubles when full, so appending T tokens costs
  O(T) amortised copies, never the O(T^2) of a torch.cat per chunk;
- preallocated (`HyloCache(config, batch_size=B, max_length=N, device=..., dtype=...)`): one [B, N, r + rope]
  buffer per MLA layer and zero-filled conv / recurrent states, written in place. With `static=True` every
  layer's decode step has fixed shapes and addresses (a device position tensor instead of a Python length),
  which is what a CUDA graph needs (see hylo_lab/inference.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LinearState:
    """A linear block's fixed-size state: short-conv tails {name: [B, C, W-1]} and the recurrent state
    [B, H, K, V] (float32). With `static`, updates copy into the existing tensors (fixed addresses)."""

    conv: dict = field(default_factory=dict)
    recurrent: torch.Tensor | None = None
    static: bool = False

    def set_conv(self, name, value):
        old = self.conv.get(name)
        if self.static and old is not None:
            old.copy_(value)
        else:
            self.conv[name] = value

    def set_recurrent(self, value):
        if self.static and self.recurrent is not None:
            self.recurrent.copy_(value)
        else:
            self.recurrent = value

    def tensors(self):
        return [*self.conv.values(), *([self.recurrent] if self.recurrent is not None else [])]


class MLAState:
    """MLA keeps only the normalised latent [B, T, kv_lora_rank] and the shared RoPE key [B, T, qk_rope_head_dim],
    side by side in one buffer `kv` [B, capacity, kv_lora_rank + qk_rope_head_dim] of which `length` rows are
    filled. `latent`, `k_rope` and `filled()` are views, never copies. `position` (a device long tensor [1],
    static caches only) is the row the next decode token writes to."""

    def __init__(self, latent=None, k_rope=None):
        self.kv, self.length, self.rank, self.position = None, 0, None, None
        if latent is not None:
            self.append(latent, k_rope)

    @property
    def static(self) -> bool:
        return self.position is not None

    def allocate(self, batch_size, capacity, rank, rope, *, device=None, dtype=None, position=None):
        self.kv = torch.zeros(batch_size, capacity, rank + rope, device=device, dtype=dtype)
        self.rank, self.length, self.position = rank, 0, position
        return self

    @property
    def capacity(self) -> int:
        return 0 if self.kv is None else self.kv.shape[1]

    def filled(self):
        return None if self.kv is None else self.kv[:, : self.length]

    @property
    def latent(self):
        return None if self.kv is None else self.kv[:, : self.length, : self.rank]

    @property
    def k_rope(self):
        return None if self.kv is None else self.kv[:, : self.length, self.rank:]

    def append(self, latent, k_rope):
        """Write T new rows after the filled ones (growing the buffer by doubling if needed); returns the
        (latent, k_rope) views over everything filled."""
        B, T, r = latent.shape
        need = self.length + T
        if self.kv is None or need > self.capacity or self.kv.dtype != latent.dtype:
            if self.static and self.kv is not None and need > self.capacity:
                raise RuntimeError(f"preallocated MLA cache holds {self.capacity} tokens; {need} needed")
            cap = max(need, 2 * self.capacity, 16)
            buf = latent.new_zeros(B, cap, r + k_rope.shape[-1])
            if self.length:
                buf[:, : self.length] = self.kv[:, : self.length]
            self.kv, self.rank = buf, r
        self.kv[:, self.length: need, : r] = latent
        self.kv[:, self.length: need, r:] = k_rope
        self.length = need
        return self.latent, self.k_rope

    def write_at_position(self, latent, k_rope):
        """Static decode: write one token [B, 1, *] at row `position` (a device tensor: no host sync)."""
        self.kv.index_copy_(1, self.position, torch.cat([latent, k_rope], dim=-1).to(self.kv.dtype))

    def tensors(self):
        return [] if self.kv is None else [self.filled()]

    def index_select(self, idx):
        if self.kv is not None:
            self.kv = self.kv.index_select(0, idx.to(self.kv.device))


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
    """One state object per layer, chosen by `config.mixers`; `seq_length` counts the tokens already seen.

    With `max_length` the cache is preallocated for `batch_size` rows: MLA buffers of `max_length` tokens,
    zero conv tails (`dtype`) and zero float32 recurrent states, updated in place. `static=True` (needs
    `max_length`) also keeps `position`, a device long tensor [1] = the next token's row, advanced by the
    static decode step (hylo_lab/inference.py) so that step can run inside a CUDA graph.
    """

    def __init__(self, config, *, batch_size: int | None = None, max_length: int | None = None, device=None,
                 dtype=None, static: bool = False):
        self.mixers = list(config.mixers)
        self.layers = [STATE_CLASSES[m]() for m in self.mixers]
        self.seq_length = 0
        self.max_length = max_length
        self.position = None
        if static and max_length is None:
            raise ValueError("a static cache needs max_length")
        if max_length is not None:
            self._preallocate(config, batch_size or 1, max_length, device, dtype or torch.get_default_dtype(), static)

    def _preallocate(self, config, B, N, device, dtype, static):
        if "attention" in self.mixers:
            raise ValueError("preallocation covers MLA and linear layers; plain attention layers still grow")
        if static:
            self.position = torch.zeros(1, dtype=torch.long, device=device)
        zeros = dict(device=device, dtype=dtype)
        for m, st in zip(self.mixers, self.layers):
            if m == "mla":
                st.allocate(B, N, config.kv_lora_rank, config.qk_rope_head_dim, device=device, dtype=dtype,
                            position=self.position)
            elif m == "gdn":
                H, K, V, W = config.gdn_num_heads, config.gdn_head_dim, config.gdn_head_v_dim, config.gdn_conv_size
                if config.gdn_use_short_conv:
                    st.conv = {"q_conv1d": torch.zeros(B, H * K, W - 1, **zeros),
                               "k_conv1d": torch.zeros(B, H * K, W - 1, **zeros),
                               "v_conv1d": torch.zeros(B, H * V, W - 1, **zeros)}
                st.recurrent = torch.zeros(B, H, K, V, device=device, dtype=torch.float32)
                st.static = True
            elif m == "mamba2":
                H, P, N_ = config.num_attention_heads, config.head_dim, config.mamba2_state_size
                conv_dim = 2 * config.num_key_value_heads * config.head_dim + H * P
                st.conv = {"conv1d": torch.zeros(B, conv_dim, config.mamba2_conv_kernel - 1, **zeros)}
                st.recurrent = torch.zeros(B, H, N_, P, device=device, dtype=torch.float32)
                st.static = True

    @property
    def static(self) -> bool:
        return self.position is not None

    def sync_position(self):
        """After a prefill through the model's forward, point the static decode at row `seq_length`."""
        if self.position is not None:
            self.position.fill_(self.seq_length)

    def advance(self, n: int = 1):
        """Host-side bookkeeping after `n` static decode steps (the steps advanced `position` themselves)."""
        self.seq_length += n
        for m, st in zip(self.mixers, self.layers):
            if m == "mla":
                st.length += n

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
            if isinstance(st, MLAState):
                st.index_select(beam_idx)
                continue
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
