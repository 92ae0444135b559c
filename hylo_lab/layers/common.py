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

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


class Rotary(nn.Module):
    """cos/sin tables for RoPE of width `dim`, from a `rope_parameters` dict through transformers' RoPE
    utilities (default, linear, llama3, yarn, longrope), so YaRN means exactly what transformers means.

    The frequencies are not a buffer: they are derived from the config, so loading a checkpoint (which builds
    modules on the meta device) can never leave them uninitialised, and changing `rope_parameters` (a YaRN
    stage) only needs a new Rotary.
    """

    def __init__(self, dim: int, rope_parameters: dict, max_position_embeddings: int):
        super().__init__()
        self.dim = dim
        self.rope_parameters = dict(rope_parameters)
        self.max_position_embeddings = max_position_embeddings
        self.rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default"))
        if self.rope_type == "dynamic" or self.rope_type not in ("default", "linear", "llama3", "yarn", "longrope"):
            raise ValueError(f"rope_type {self.rope_type!r} is not supported; use default, linear, llama3, yarn or longrope")
        self._tables = {}
        self.inv_freq, self.scaling = self._compute()

    def _compute(self):
        with torch.device("cpu"):
            theta = float(self.rope_parameters.get("rope_theta", 10000.0))
            if self.rope_type == "default":
                inv_freq = 1.0 / (theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim))
                return inv_freq.float(), 1.0
            from transformers import PretrainedConfig
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            params = dict(self.rope_parameters, rope_type=self.rope_type, rope_theta=theta)
            shim = PretrainedConfig(rope_parameters=params, head_dim=self.dim, hidden_size=self.dim,
                                    num_attention_heads=1, max_position_embeddings=self.max_position_embeddings)
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](shim, torch.device("cpu"))
            return inv_freq.float(), float(scaling)

    @torch.no_grad()
    def forward(self, position_ids, dtype, scaled: bool = True):
        """position_ids [B, T] -> cos, sin [B, T, dim] in `dtype` (computed in float32), times the RoPE type's
        attention factor (YaRN's mscale) unless scaled=False: rotating q and k both then scales every logit by
        its square, as transformers does. MLA rotates only part of each head, so it takes unscaled tables and
        the squared factor as a temperature on the whole logit instead (DeepSeek-V2's softmax_scale * mscale^2)."""
        dev = position_ids.device
        if dev not in self._tables:
            self._tables[dev] = self.inv_freq.to(dev)
        freqs = position_ids[..., None].float() * self._tables[dev]
        emb = torch.cat([freqs, freqs], dim=-1)
        factor = self.scaling if scaled else 1.0
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)
