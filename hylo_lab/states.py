"""Per-layer cache states: what one token mixer keeps between calls, for every row of a batch.

A layer class says which state it uses (the `state` column of mixers.MIXERS) and its shapes
(`cls.cache_shapes(config)`, a dict of any of):
    per_token: {name: width}         rows that grow with every token (MLA latent and RoPE key, attention K/V)
    conv: {name: (channels, W - 1)}  short-conv tails, in the cache dtype
    recurrent: (H, K, V)             the recurrent state, float32
`preallocate(shapes, ...)` fills a fresh state from those shapes (HyloCache with max_length).
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

    def preallocate(self, shapes, batch_size, max_length, *, device=None, dtype=None, position=None):
        """Zero conv tails (`dtype`) and a zero float32 recurrent state, updated in place from now on."""
        self.conv = {name: torch.zeros(batch_size, *shape, device=device, dtype=dtype)
                     for name, shape in shapes.get("conv", {}).items()}
        if "recurrent" in shapes:
            self.recurrent = torch.zeros(batch_size, *shapes["recurrent"], device=device, dtype=torch.float32)
        self.static = True
        return self


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

    def preallocate(self, shapes, batch_size, max_length, *, device=None, dtype=None, position=None):
        widths = shapes["per_token"]
        return self.allocate(batch_size, max_length, widths["latent"], widths["k_rope"], device=device, dtype=dtype,
                             position=position)

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

    def preallocate(self, shapes, batch_size, max_length, **_):
        raise ValueError("preallocation covers MLA and linear layers; plain attention layers still grow")
