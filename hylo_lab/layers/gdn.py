"""Gated DeltaNet token mixer with flash-linear-attention's GatedDeltaNet parameter names and defaults.

x [B, T, D] -> q, k [B, T, H, K], v [B, T, H, V] (projections, short causal conv + SiLU, q/k L2-normalised)
decay g = -exp(A_log) * softplus(a_proj(x) + dt_bias), beta = sigmoid(b_proj(x))   [B, T, H]
o = gated_delta_rule(q, k, v, g, beta)  (ops/gated_delta.py), o_norm(o, g_proj(x)) per head, o_proj.

Weights map one to one onto fla's layer (q_proj, k_proj, v_proj, a_proj, b_proj, A_log, dt_bias,
q_conv1d/k_conv1d/v_conv1d [C, 1, W] without bias, g_proj, o_norm.weight [V], o_proj). One key head per
value head (fla's num_v_heads = num_heads); allow_neg_eigval is off, as fla's default.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from hylo_lab.states import LinearState
from hylo_lab.layers.common import GatedRMSNorm, RMSNorm
from hylo_lab.ops.conv import causal_conv1d
from hylo_lab.ops.gated_delta import gated_delta_rule

CONV_NAMES = ("q_conv1d", "k_conv1d", "v_conv1d")


def short_conv(channels: int, kernel_size: int, bias: bool) -> nn.Conv1d:
    """fla's ShortConvolution is an nn.Conv1d (depthwise, weight [C, 1, W]); we only use its parameters."""
    return nn.Conv1d(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)


def padding_mask(attention_mask, T: int):
    """[B, >=T] (1 = real token, 0 = left padding; a generate-style mask over past + new tokens is fine)
    -> [B, T, 1] float mask for the T new tokens, or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[1] < T:
        raise ValueError(f"attention_mask must be [B, >= T={T}] with 1 for real tokens, got {tuple(attention_mask.shape)}")
    return attention_mask[:, -T:, None]


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet (Yang et al. 2024, arXiv 2412.06464) as flash-linear-attention's layer.

    Dims from config: hidden_size, gdn_num_heads (H), gdn_head_dim (K), gdn_head_v_dim (V = K * gdn_expand_v),
    gdn_conv_size, gdn_use_short_conv, gdn_use_gate, gdn_norm_eps; chunk_size and kernel_backend for the op.
    State (LinearState): conv {"q_conv1d": [B, H*K, W-1], "k_conv1d": ..., "v_conv1d": [B, H*V, W-1]} in the
    input dtype, recurrent [B, H, K, V] in float32.
    """

    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.gdn_num_heads
        self.head_k_dim = config.gdn_head_dim
        self.head_v_dim = config.gdn_head_v_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.value_dim = self.num_heads * self.head_v_dim
        self.conv_size = config.gdn_conv_size
        self.use_short_conv = config.gdn_use_short_conv
        self.use_gate = config.gdn_use_gate
        self.chunk_size = config.chunk_size
        self.kernel_backend = config.kernel_backend

        D, H = self.hidden_size, self.num_heads
        self.q_proj = nn.Linear(D, self.key_dim, bias=False)
        self.k_proj = nn.Linear(D, self.key_dim, bias=False)
        self.v_proj = nn.Linear(D, self.value_dim, bias=False)
        self.a_proj = nn.Linear(D, H, bias=False)
        self.b_proj = nn.Linear(D, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        if self.use_short_conv:
            self.q_conv1d = short_conv(self.key_dim, self.conv_size, bias=False)
            self.k_conv1d = short_conv(self.key_dim, self.conv_size, bias=False)
            self.v_conv1d = short_conv(self.value_dim, self.conv_size, bias=False)
        else:
            warnings.warn("GatedDeltaNet without short convolutions (gdn_use_short_conv=False) is a known "
                          "quality loss; fla warns the same", stacklevel=2)
        if self.use_gate:
            self.g_proj = nn.Linear(D, self.value_dim, bias=False)
            self.o_norm = GatedRMSNorm(self.head_v_dim, eps=config.gdn_norm_eps, norm_before_gate=True)
        else:
            self.o_norm = RMSNorm(self.head_v_dim, eps=config.gdn_norm_eps)
        self.o_proj = nn.Linear(self.value_dim, D, bias=False)
        self.packed_decode = False  # set_packed_decode (inference.pack_decode_projections) turns it on
        self._packed = None
        self.reset_parameters_hylo()

    @torch.no_grad()
    def reset_parameters_hylo(self):
        """fla's init of what nn.Linear does not cover: A ~ U(0, 16), A_log = log A; dt ~ log-uniform
        [1e-3, 1e-1] floored at 1e-4, dt_bias = softplus^-1(dt); default nn.Conv1d init; norm weight 1."""
        H = self.num_heads
        A = torch.empty(H, dtype=torch.float32, device=self.A_log.device).uniform_(0, 16)
        self.A_log.copy_(torch.log(A))
        dt_min, dt_max, dt_floor = 1e-3, 1e-1, 1e-4
        u = torch.rand(H, dtype=torch.float32, device=self.dt_bias.device)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        if self.use_short_conv:
            for name in CONV_NAMES:
                getattr(self, name).reset_parameters()
        self.o_norm.weight.fill_(1.0)

    @classmethod
    def cache_shapes(cls, config) -> dict:
        H, K, V, W = config.gdn_num_heads, config.gdn_head_dim, config.gdn_head_v_dim, config.gdn_conv_size
        conv = {"q_conv1d": (H * K, W - 1), "k_conv1d": (H * K, W - 1), "v_conv1d": (H * V, W - 1)}
        return {"conv": conv if config.gdn_use_short_conv else {}, "recurrent": (H, K, V)}

    @classmethod
    def describe(cls, config) -> str:
        return f"{config.gdn_num_heads} heads x {config.gdn_head_dim} (v {config.gdn_head_v_dim}), conv {config.gdn_conv_size}"

    @torch.no_grad()
    def from_attention(self, w, **_) -> dict:
        """In place, from a base attention block `w` (base_checkpoint.AttentionWeights): W_K, W_V repeated to the H query
        heads (GQA order); the overlapping rows of W_Q, W_K, W_V copied into q_proj, k_proj, v_proj and W_O into
        the overlapping columns of o_proj; the rest keeps its init. q/k/v biases have no slot (dropped).
        Returns how many rows were copied."""
        rep = w.H // w.Hkv
        D = w.q.shape[1]
        k = w.k.view(w.Hkv, w.hd, D).repeat_interleave(rep, dim=0).reshape(-1, D)
        v = w.v.view(w.Hkv, w.hd, D).repeat_interleave(rep, dim=0).reshape(-1, D)
        nk, nv = min(self.key_dim, w.q.shape[0]), min(self.value_dim, v.shape[0])
        self.q_proj.weight[:nk] = w.q[:nk].to(self.q_proj.weight.dtype)
        self.k_proj.weight[:nk] = k[:nk].to(self.k_proj.weight.dtype)
        self.v_proj.weight[:nv] = v[:nv].to(self.v_proj.weight.dtype)
        self.o_proj.weight[:, :nv] = w.o[:, :nv].to(self.o_proj.weight.dtype)
        return {"qk_rows": nk, "v_rows": nv}

    def forward(self, hidden_states, *, state: LinearState | None = None, attention_mask=None):
        """hidden_states [B, T, D] -> [B, T, D]. With `state`, its conv tails and recurrent state are read as
        the initial ones (None = zeros) and replaced by the new ones, so prefill, chunked prefill and decode
        are the same call. Left-padded positions (attention_mask 0) are zeroed and leave the states untouched.
        """
        Bsz, T, _ = hidden_states.shape
        mask = padding_mask(attention_mask, T)
        x = hidden_states if mask is None else hidden_states * mask.to(hidden_states.dtype)

        packed = (self.packed_decode and T == 1 and mask is None and state is not None and state.static
                  and not torch.is_grad_enabled())
        q, k, v, a, b, gate = (self._packed_inputs if packed else self._inputs)(x, state)
        q = q.view(Bsz, T, self.num_heads, self.head_k_dim)
        k = k.view(Bsz, T, self.num_heads, self.head_k_dim)
        v = v.view(Bsz, T, self.num_heads, self.head_v_dim)

        acc = torch.promote_types(x.dtype, torch.float32)  # gates in float32 (float64 stays float64)
        g = -self.A_log.to(acc).exp() * F.softplus(a.to(acc) + self.dt_bias.to(acc))
        beta = b.to(acc).sigmoid()
        if mask is not None:  # decay 1 and no write at padded positions
            g = g * mask.to(g.dtype)
            beta = beta * mask.to(beta.dtype)

        o, final = gated_delta_rule(
            q, k, v, g, beta, initial_state=state.recurrent if state is not None else None,
            output_final_state=state is not None, use_qk_l2norm=True, chunk_size=self.chunk_size,
            backend=self.kernel_backend)
        if state is not None:
            state.set_recurrent(final)

        if self.use_gate:
            o = self.o_norm(o, gate.view(Bsz, T, self.num_heads, self.head_v_dim))
        else:
            o = self.o_norm(o)
        return self.o_proj(o.reshape(Bsz, T, self.value_dim))

    def _inputs(self, x, state):
        """q, k, v after the short convs (tails written to `state`), the decay and beta pre-activations, the
        output gate (None without one): one projection per weight."""
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.use_short_conv:
            out = []
            for name, t in zip(CONV_NAMES, (q, k, v)):
                conv = getattr(self, name)
                prev = state.conv.get(name) if state is not None else None
                y, tail = causal_conv1d(t, conv.weight, conv.bias, state=prev, activation="silu")
                if state is not None:
                    state.set_conv(name, tail)
                out.append(y)
            q, k, v = out
        else:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        return q, k, v, self.a_proj(x), self.b_proj(x), self.g_proj(x) if self.use_gate else None

    def _packed_inputs(self, x, state):
        """`_inputs` for one decode token into a static cache: one matrix-vector product over the six projection
        weights stacked, one short-conv step over the three convs' channels side by side (same arithmetic per
        output row; a decode step is launch-bound, so fewer, larger kernels)."""
        w, conv_w, conv_b = self.packed_weights()
        sizes = [self.key_dim, self.key_dim, self.value_dim, self.num_heads, self.num_heads]
        sizes += [self.value_dim] if self.use_gate else []
        qkv_end = 2 * self.key_dim + self.value_dim
        z = F.linear(x, w)
        qkv = z[..., :qkv_end]
        if self.use_short_conv:
            prev = torch.cat([state.conv[name] for name in CONV_NAMES], dim=1)
            qkv, tail = causal_conv1d(qkv, conv_w, conv_b, state=prev, activation="silu")
            for name, t in zip(CONV_NAMES, tail.split(sizes[:3], dim=1)):
                state.set_conv(name, t)
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split(sizes[:3], dim=-1)
        a, b, *gate = z[..., qkv_end:].split(sizes[3:], dim=-1)
        return q, k, v, a, b, gate[0] if gate else None

    def packed_weights(self):
        """The projection weights stacked [q; k; v; a; b (; g)] and the conv weights / biases side by side, built
        once and rebuilt only when a weight changes (moved, replaced or updated in place): a copy of the
        projections (`packed_nbytes`) while `packed_decode` is on."""
        projs = [self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj]
        projs += [self.g_proj] if self.use_gate else []
        convs = [getattr(self, name) for name in CONV_NAMES] if self.use_short_conv else []
        params = [m.weight for m in projs] + [p for c in convs for p in (c.weight, c.bias) if p is not None]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._packed is None or self._packed[0] != key:
            with torch.no_grad():
                w = torch.cat([m.weight for m in projs])
                conv_w = torch.cat([c.weight.squeeze(1) for c in convs]) if convs else None
                conv_b = torch.cat([c.bias for c in convs]) if convs and convs[0].bias is not None else None
            self._packed = (key, w, conv_w, conv_b)
        return self._packed[1:]

    def set_packed_decode(self, enable: bool) -> int:
        """Turn the packed decode step on (the stacked copy built now) or off (the copy dropped); its bytes."""
        self.packed_decode = enable
        if enable:
            self.packed_weights()
        else:
            self._packed = None
        return self.packed_nbytes

    @property
    def packed_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._packed[1:] if t is not None) if self._packed else 0
