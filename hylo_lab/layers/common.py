"""Pieces every decoder layer shares: RMSNorm, gated RMSNorm, SwiGLU MLP, rotary embedding helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 (Llama/Qwen convention)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):  # F.rms_norm: one fused kernel on CUDA where torch has one, the same math elsewhere
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate over groups of `group_size` channels.

    norm_before_gate=True  (flash-linear-attention's GDN output norm): rmsnorm(x) * weight * silu(g)
    norm_before_gate=False (Mamba2's RMSNormGated default):           rmsnorm(x * silu(g)) * weight
    """

    def __init__(self, dim: int, eps: float = 1e-5, *, norm_before_gate: bool = True, group_size: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.norm_before_gate = norm_before_gate
        self.group_size = group_size or dim

    def forward(self, x, g):
        dtype = x.dtype
        x, g = x.float(), g.float()
        if not self.norm_before_gate:
            x = x * F.silu(g)
        shape = x.shape
        x = x.reshape(*shape[:-1], -1, self.group_size)
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).reshape(shape)
        x = x * self.weight.float()
        if self.norm_before_gate:
            x = x * F.silu(g)
        return x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), names as in transformers' Llama/Qwen."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
            raise ValueError(f"unsupported hidden_act {act!r}")
        self.act = act

    def forward(self, x):
        g = self.gate_proj(x)
        if self.act in ("silu", "swish"):
            g = F.silu(g)
        elif self.act == "relu":
            g = F.relu(g)
        else:
            g = F.gelu(g, approximate="tanh" if self.act == "gelu_pytorch_tanh" else "none")
        return self.down_proj(g * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    """x: [B, T, H, D]; cos, sin: [B, T, D] (half-split layout, as transformers' Llama)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


def rope_frequencies(rope_parameters: dict, head_dim: int, max_position_embeddings: int, *, long: bool = False):
    """(inv_freq [head_dim/2] float32, attention factor) exactly as transformers computes them for a head of width
    head_dim: its default formula in float32 (1 / theta^(2j/hd), as every model's compute_default_rope_parameters),
    else ROPE_INIT_FUNCTIONS. long=True: longrope's long factors (transformers uses them for a forward whose
    largest position is >= original_max_position_embeddings)."""
    params = dict(rope_parameters)
    rope_type = params.setdefault("rope_type", params.pop("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
    theta = params.setdefault("rope_theta", 10000.0)
    with torch.device("cpu"):
        if rope_type == "default":
            return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(params.get(key) or ()) != head_dim // 2:
                    raise ValueError(f"longrope's {key} has {len(params.get(key) or ())} entries but a head of "
                                     f"{head_dim} dims has {head_dim // 2} frequencies: give one per pair")
        from transformers import PretrainedConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        shim = PretrainedConfig(rope_parameters=params, head_dim=head_dim, hidden_size=head_dim, num_attention_heads=1,
                                max_position_embeddings=max_position_embeddings)
        seq_len = params.get("original_max_position_embeddings", max_position_embeddings) + 1 if long else None
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](shim, torch.device("cpu"), seq_len=seq_len)
        return inv_freq.float(), float(scaling)


class Rotary(nn.Module):
    """cos/sin tables for RoPE with the frequencies transformers gives a head of width `head_dim` under
    `rope_parameters` (rope_frequencies: default, linear, llama3, yarn, longrope), bit for bit.

    pairs: which of those head_dim/2 frequencies the table rotates (an upcycled MLA keeps some pairs of the base
    head: mla.rope_pairs); the table is then 2 * len(pairs) wide, pair i rotating dims i and i + len(pairs).
    None = all. longrope switches to its long factors for a forward whose largest position is >=
    original_max_position_embeddings, as transformers' dynamic_rope_update does (per call, no host sync).

    The frequencies are not a buffer: they are derived from the config, so loading a checkpoint (which builds
    modules on the meta device) can never leave them uninitialised, and changing `rope_parameters` (a YaRN
    stage) only needs a new Rotary.
    """

    def __init__(self, head_dim: int, rope_parameters: dict, max_position_embeddings: int, *, pairs=None):
        super().__init__()
        self.head_dim = head_dim
        self.rope_parameters = dict(rope_parameters)
        self.max_position_embeddings = max_position_embeddings
        self.rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
        self.pairs = list(range(head_dim // 2)) if pairs is None else [int(j) for j in pairs]
        if not self.pairs or not all(0 <= j < head_dim // 2 for j in self.pairs):
            raise ValueError(f"RoPE pairs {self.pairs} must be frequencies 0..{head_dim // 2 - 1} "
                             f"of a {head_dim}-dim head")
        self.dim = 2 * len(self.pairs)
        inv_freq, self.scaling = rope_frequencies(self.rope_parameters, head_dim, max_position_embeddings)
        self.inv_freq = inv_freq[self.pairs]
        self.long_inv_freq = None
        if self.rope_type == "longrope":
            self.original_max_position_embeddings = self.rope_parameters.get("original_max_position_embeddings",
                                                                             max_position_embeddings)
            long, _ = rope_frequencies(self.rope_parameters, head_dim, max_position_embeddings, long=True)
            self.long_inv_freq = long[self.pairs]
        self._tables = {}

    def frequencies(self, position_ids):
        """inv_freq on position_ids' device; longrope's long set when max(position_ids) + 1 exceeds the original
        length (one set for the whole call, as transformers picks it)."""
        dev = position_ids.device
        if dev not in self._tables:
            long = None if self.long_inv_freq is None else self.long_inv_freq.to(dev)
            self._tables[dev] = (self.inv_freq.to(dev), long)
        short, long = self._tables[dev]
        if long is None:
            return short
        return torch.where(position_ids.max() + 1 > self.original_max_position_embeddings, long, short)

    @torch.no_grad()
    def forward(self, position_ids, dtype, scaled: bool = True):
        """position_ids [B, T] -> cos, sin [B, T, dim] in `dtype` (computed in float32), times the RoPE type's
        attention factor (YaRN's mscale) unless scaled=False: rotating q and k both then scales every logit by
        its square, as transformers does. MLA rotates only part of each head, so it takes unscaled tables and
        the squared factor as a temperature on the whole logit instead (DeepSeek-V2's softmax_scale * mscale^2)."""
        freqs = position_ids[..., None].float() * self.frequencies(position_ids)
        emb = torch.cat([freqs, freqs], dim=-1)
        factor = self.scaling if scaled else 1.0
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def mla_rotary(config) -> Rotary:
    """The MLA layers' Rotary: config.mla_rope_parameters over the base head (config.head_dim) at the kept pairs
    config.mla_rope_pairs (an upcycled hybrid), or over the MLA's own qk_rope_head_dim when those are None (a
    hybrid built from scratch, or saved before mla_rope_pairs existed)."""
    pairs = getattr(config, "mla_rope_pairs", None)
    head_dim = config.qk_rope_head_dim if pairs is None else config.head_dim
    return Rotary(head_dim, config.mla_rope_parameters, config.max_position_embeddings, pairs=pairs)
