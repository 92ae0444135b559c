"""Attention-shaped Mamba2 token mixer, as in MambaInLlama / Zebra-Llama (method.md section 3).

Shapes follow the attention block it replaces: nheads H = num_attention_heads, headdim P = head_dim,
d_inner = H*P, d_xb = H_kv*P, d_state N = mamba2_state_size (= head_dim), one B/C group per head.
    in_proj: x [B, T, D] -> [z (d_inner) | x (d_xb) | B (d_xb) | C (d_inner) | dt (H)]   (bias=False)
    conv1d (depthwise, kernel W, bias, SiLU) over [x, B, C] (conv_dim = 2*d_xb + d_inner), BEFORE x and B
    are repeated from H_kv groups to H heads (head h reads kv group h // (H / H_kv), like repeat_kv)
    dt = softplus(dt + dt_bias); A = -exp(A_log); y = ssd(x, dt, A, B, C) + D*x   (ops/ssd.py)
    y = norm(y, z): gated RMSNorm, gate before norm (rmsnorm(y * silu(z)) * weight), per-head groups
    out_proj: d_inner -> D
The upcycling map (x <- W_V, B <- W_K, C <- W_Q, out_proj <- W_O) is why N must equal P: B is a KV-head
slice of width head_dim used as a state-sized key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hylo_lab.states import LinearState
from hylo_lab.layers.common import GatedRMSNorm
from hylo_lab.ops.conv import causal_conv1d
from hylo_lab.ops.ssd import ssd

NORM_EPS = 1e-5  # mamba-ssm's RMSNormGated default


def padding_mask(attention_mask, T: int):
    """[B, >=T] (1 = real token, 0 = left padding; a generate-style mask over past + new tokens is fine)
    -> [B, T, 1] mask for the T new tokens, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must be [B, >= T={T}] with 1 for real tokens, got {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:, None]


class Mamba2(nn.Module):
    """Mamba2 with MambaInLlama's attention-shaped dimensions and mamba-ssm's parameter names.

    Parameters: in_proj, conv1d (nn.Conv1d, weight [conv_dim, 1, W], bias), dt_bias [H], A_log [H], D [H],
    norm.weight [d_inner], out_proj. State (LinearState): conv {"conv1d": [B, conv_dim, W-1]} in the input
    dtype, recurrent [B, H, N, P] in float32.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = config.hidden_size
        self.nheads = config.num_attention_heads
        self.headdim = config.head_dim
        self.num_kv_heads = config.num_key_value_heads
        self.d_state = config.mamba2_state_size
        self.d_conv = config.mamba2_conv_kernel
        self.chunk_size = config.chunk_size
        self.kernel_backend = config.kernel_backend
        if self.d_state != self.headdim:
            raise ValueError(
                f"attention-shaped Mamba2 needs mamba2_state_size == head_dim: B is a KV-head slice of width "
                f"head_dim={self.headdim} used as the state-sized key, so mamba2_state_size={self.d_state} cannot work")
        if self.nheads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads={self.nheads} must be a multiple of num_key_value_heads={self.num_kv_heads}")
        self.repeat_group = self.nheads // self.num_kv_heads
        self.d_inner = self.nheads * self.headdim
        self.d_xb = self.num_kv_heads * self.headdim
        self.ngroups = self.nheads
        self.conv_dim = 2 * self.d_xb + self.d_inner
        # MambaInLlama / Zebra-Llama build RMSNormGated(d_inner, group_size=d_inner // ngroups) with
        # ngroups = num_attention_heads: the output norm is per head.
        self.norm_group_size = self.d_inner // self.ngroups

        H = self.nheads
        self.in_proj = nn.Linear(self.d_model, 2 * self.d_inner + 2 * self.d_xb + H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, eps=NORM_EPS, norm_before_gate=False, group_size=self.norm_group_size)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=False)
        self.reset_parameters_hylo()

    @torch.no_grad()
    def reset_parameters_hylo(self):
        """mamba-ssm's Mamba2 init of what nn.Linear does not cover: dt ~ log-uniform [1e-3, 1e-1] floored at
        1e-4, dt_bias = softplus^-1(dt); A ~ U(1, 16), A_log = log A; D = 1; default nn.Conv1d init; norm 1."""
        H = self.nheads
        dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
        u = torch.rand(H, dtype=torch.float32, device=self.dt_bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(H, dtype=torch.float32, device=self.A_log.device).uniform_(1, 16)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        self.conv1d.reset_parameters()
        self.norm.weight.fill_(1.0)

    @classmethod
    def cache_shapes(cls, config) -> dict:
        H, P, N = config.num_attention_heads, config.head_dim, config.mamba2_state_size
        conv_dim = 2 * config.num_key_value_heads * config.head_dim + H * P
        return {"conv": {"conv1d": (conv_dim, config.mamba2_conv_kernel - 1)}, "recurrent": (H, N, P)}

    @classmethod
    def describe(cls, config) -> str:
        return (f"{config.num_attention_heads} heads x {config.head_dim}, state {config.mamba2_state_size}, "
                f"conv {config.mamba2_conv_kernel}")

    @torch.no_grad()
    def from_attention(self, w, *, mamba2_D: float = 0.0, **_) -> dict:
        """In place, from a base attention block `w` (base_checkpoint.AttentionWeights), MambaInLlama's map:
        in_proj rows [z | x <- W_V | B <- W_K | C <- W_Q | dt], out_proj <- W_O, D = `mamba2_D`; z, dt, A_log,
        conv and norm keep their init, RoPE is dropped. q/k/v biases move into the conv bias
        (conv1d.bias += b * sum of the channel's taps: exact but for the first W-1 tokens, which read padding).
        D = 0, not mamba-ssm's 1: with x <- W_V and dt ~ 1e-3..1e-1 at init, D = 1 makes the block output mostly
        the current token's value; with D = 0 it starts as the base attention with the softmax removed (up to
        decay, conv and gate). mamba2_D=1.0 gives MambaInLlama's start."""
        W = self.in_proj.weight
        for off, src in ((self.d_inner, w.v), (self.d_inner + self.d_xb, w.k), (self.d_inner + 2 * self.d_xb, w.q)):
            W[off: off + src.shape[0]] = src.to(W.dtype)
        self.out_proj.weight.copy_(w.o.to(self.out_proj.weight.dtype))
        self.D.fill_(mamba2_D)
        if w.q_bias is not None:
            b = torch.cat([w.v_bias, w.k_bias, w.q_bias])  # conv channels [x | B | C]
            taps = self.conv1d.weight.detach().to(b.dtype).reshape(self.conv_dim, -1).sum(-1)
            self.conv1d.bias.add_((b * taps).to(self.conv1d.bias.dtype))
        return {}

    def forward(self, hidden_states, *, state: LinearState | None = None, attention_mask=None):
        """hidden_states [B, T, D] -> [B, T, D]. With `state`, its conv tail and recurrent state are read as
        the initial ones (None = zeros) and replaced by the new ones, so prefill, chunked prefill and decode
        are the same call. Left-padded positions (attention_mask 0) are zeroed and leave the states untouched.
        """
        Bsz, T, _ = hidden_states.shape
        dtype = hidden_states.dtype
        mask = padding_mask(attention_mask, T)
        u = hidden_states if mask is None else hidden_states * mask.to(dtype)

        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC, conv_tail = causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias,
                                       state=state.conv.get("conv1d") if state is not None else None,
                                       activation="silu")
        x, B, C = xBC.split([self.d_xb, self.d_xb, self.d_inner], dim=-1)
        x = x.reshape(Bsz, T, self.num_kv_heads, self.headdim).repeat_interleave(self.repeat_group, dim=2)
        B = B.reshape(Bsz, T, self.num_kv_heads, self.d_state).repeat_interleave(self.repeat_group, dim=2)
        C = C.reshape(Bsz, T, self.nheads, self.d_state)
        acc = torch.promote_types(dtype, torch.float32)  # dt, A and the D skip in float32 (float64 stays)
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        if mask is not None:  # dt = 0: decay 1 and no write at padded positions
            dt = dt * mask.to(dt.dtype)
        A = -self.A_log.to(acc).exp()

        y, final = ssd(x, dt, A, B, C, initial_state=state.recurrent if state is not None else None,
                       output_final_state=state is not None, chunk_size=self.chunk_size,
                       backend=self.kernel_backend)
        if state is not None:
            state.set_conv("conv1d", conv_tail)
            state.set_recurrent(final)
        y = (y.to(acc) + self.D.to(acc)[:, None] * x.to(acc)).to(dtype)
        y = self.norm(y.reshape(Bsz, T, self.d_inner), z)
        return self.out_proj(y)
