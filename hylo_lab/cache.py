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

import math

import torch

from .mixers import MIXERS
from .states import KVState, LinearState, MLAState

__all__ = ["HyloCache", "cache_footprint", "KVState", "LinearState", "MLAState"]


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
        self.layers = [MIXERS[m].state() for m in self.mixers]
        self.seq_length = 0
        self.max_length = max_length
        self.position = None
        if static and max_length is None:
            raise ValueError("a static cache needs max_length")
        if max_length is not None:
            self._preallocate(config, batch_size or 1, max_length, device, dtype or torch.get_default_dtype(), static)

    def _preallocate(self, config, B, N, device, dtype, static):
        if static:
            self.position = torch.zeros(1, dtype=torch.long, device=device)
        for m, st in zip(self.mixers, self.layers):
            st.preallocate(MIXERS[m].cls.cache_shapes(config), B, N, device=device, dtype=dtype, position=self.position)

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
        for st in self.layers:
            if isinstance(st, MLAState):
                st.length += n

    def __getitem__(self, idx):
        return self.layers[idx]

    def __len__(self):
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def nbytes(self) -> dict:
        """Bytes actually held: {"growing": latents and K/V, "fixed": linear layers' states, "total"}."""
        held = {True: 0, False: 0}
        for m, st in zip(self.mixers, self.layers):
            held[MIXERS[m].linear] += sum(t.numel() * t.element_size() for t in st.tensors())
        grow, fixed = held[False], held[True]
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
        shapes = MIXERS[m].cls.cache_shapes(config)
        per_token += sum(shapes.get("per_token", {}).values()) * e
        fixed += sum(c * w for c, w in shapes.get("conv", {}).values()) * e
        if "recurrent" in shapes:
            fixed += math.prod(shapes["recurrent"]) * 4
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
