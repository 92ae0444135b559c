"""The base model's own GQA attention (Llama / Qwen2 biases / Qwen3 q-k norms), kept as is for baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import RMSNorm, apply_rotary


def causal_mask(T: int, past: int, attention_mask, device):
    """Boolean mask [B|1, 1, T, past+T]: key s is visible to query t if s <= past + t and s is not padding.

    Every query always sees itself, so fully padded rows never produce NaN.
    """
    S = past + T
    q_pos = torch.arange(past, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -S:].bool()
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


def causal_sdpa(q, k, v, past: int, attention_mask=None, scale=None):
    """SDPA over [B, H, T, D] with a causal offset of `past` cached tokens; uses the fused causal kernel
    when there is no padding and no offset."""
    T = q.shape[2]
    if attention_mask is None and (past == 0 or T == 1):
        return F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1, scale=scale)
    mask = causal_mask(T, past, attention_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def prefill_attention(q, k, v, past: int, attention_mask=None, scale=None):
    """Causal attention of T new queries over S = past + T keys, GQA-aware.

    q [B, H, T, D]; k [B, Hkv, S, D]; v [B, Hkv, S, Dv] with H a multiple of Hkv. On CUDA in half precision
    without padding this is one flash-attention call: K/V heads are shared in the kernel (never repeated)
    and the causal diagonal sits at the bottom right (query t sees keys <= past + t), so a prefill chunk
    over a long cache needs no [T, S] mask. D != Dv is padded to the larger (flash needs equal dims).
    Elsewhere: K/V repeated to H heads and causal_sdpa (the reference).
    """
    H, Hkv = q.shape[1], k.shape[1]
    if attention_mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = _flash_bottom_right(q, k, v, scale)
        if out is not None:
            return out
    rep = H // Hkv
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return causal_sdpa(q, k, v, past, attention_mask, scale=scale)


def _flash_bottom_right(q, k, v, scale):
    D, Dv = q.shape[-1], v.shape[-1]
    width = -(-max(D, Dv) // 8) * 8
    if width > 256:
        return None
    scale = D ** -0.5 if scale is None else scale
    if D != width:
        q, k = F.pad(q, (0, width - D)), F.pad(k, (0, width - D))
    if Dv != width:
        v = F.pad(v, (0, width - Dv))
    flash = torch.ops.aten._scaled_dot_product_flash_attention
    try:  # flash's own causal flag aligns the diagonal bottom-right when T < S; K/V heads shared in-kernel
        o = flash(q, k, v, 0.0, True, False, scale=scale)[0]
    except RuntimeError:
        rep = q.shape[1] // k.shape[1]
        try:  # a build whose flash entry point refuses GQA: repeat K/V, still no [T, S] mask
            o = flash(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), 0.0, True, False, scale=scale)[0]
        except RuntimeError:
            return None
    return o[..., :Dv]


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d)) v with RoPE on q and k; K/V heads repeated to the query heads."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, H, Hkv, hd = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=False)
        if config.attention_qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    @classmethod
    def cache_shapes(cls, config) -> dict:
        width = config.num_key_value_heads * config.head_dim
        return {"per_token": {"key": width, "value": width}}

    @classmethod
    def describe(cls, config) -> str:
        return f"{config.num_key_value_heads} kv heads x {config.head_dim}"

    @torch.no_grad()
    def from_attention(self, w, **_) -> dict:
        """In place: the base block `w.module` verbatim (weights, q/k/v biases, q/k norms)."""
        src = w.module
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            for p in ("weight", "bias"):
                dst = getattr(getattr(self, name), p)
                if dst is not None:
                    dst.copy_(getattr(getattr(src, name), p))
        if self.q_norm is not None:
            self.q_norm.weight.copy_(src.q_norm.weight)
            self.k_norm.weight.copy_(src.k_norm.weight)
        return {}

    def forward(self, x, *, rope, state=None, attention_mask=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if state is not None:
            past = 0 if state.key is None else state.key.shape[1]
            k, v = state.append(k, v)
        rep = self.num_heads // self.num_kv_heads
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = causal_sdpa(q, k, v, past, attention_mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
