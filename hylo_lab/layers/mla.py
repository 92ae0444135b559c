"""Multi-head latent attention (DeepSeek naming), GQA-style: the latent expands to `mla_num_kv_heads` K/V heads.

Per token the cache holds only c = kv_a_layernorm(kv_a(x))[:r] (r = kv_lora_rank) and the shared RoPE key
k_rope (qk_rope_head_dim), both after RoPE/normalisation. Prefill expands the latent to per-head K/V and runs
fused attention. Decode never expands the cache: kv_b_proj is absorbed into the query (scores = q_nope W_kb c
+ q_rope k_rope) and into the output (o = W_vb (p @ c)), so a step costs O(S * r) per head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.low_rank import kept_energy, low_rank
from ..ops.mla_decode import mla_decode
from .attention import causal_mask, prefill_attention
from .common import RMSNorm, apply_rotary

# Above this many new tokens with a non-empty cache, expanding K/V beats the absorbed form.
ABSORB_MAX_TOKENS = 16


class MLA(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        D = config.hidden_size
        self.num_heads = H = config.num_attention_heads
        self.num_kv_heads = Hkv = config.mla_num_kv_heads
        self.nope = config.qk_nope_head_dim
        self.rope = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.q_lora_rank = config.q_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        bias = config.mla_bias
        qk = self.nope + self.rope
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=bias)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps) if config.mla_latent_norm else nn.Identity()
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * qk, bias=bias)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps) if config.mla_latent_norm else nn.Identity()
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, Hkv * (self.nope + self.v_dim), bias=bias)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)

    @classmethod
    def cache_shapes(cls, config) -> dict:
        return {"per_token": {"latent": config.kv_lora_rank, "k_rope": config.qk_rope_head_dim}}

    @classmethod
    def describe(cls, config) -> str:
        return (f"q_lora_rank {config.q_lora_rank}, kv_lora_rank {config.kv_lora_rank}, rope {config.qk_rope_head_dim}, "
                f"nope {config.qk_nope_head_dim}, v {config.v_head_dim}, rope {config.mla_rope_parameters.get('rope_type')}")

    @torch.no_grad()
    def from_attention(self, w, *, rope_init: str = "filled", **_) -> dict:
        """In place, truncated SVD (X-EcoMLA) of a base attention block `w` (base_checkpoint.AttentionWeights):
        q_a_proj = S_r V_r^T, q_b_proj = U_r of the per-head [nope | rope] query rows (attention_targets);
        kv_a_proj_with_mqa[:r] = S_r V_r^T, kv_b_proj = U_r of the stacked [K_nope; V] rows of every KV head
        (one shared latent); kv_a_proj_with_mqa[r:] (the shared RoPE key) = the mean over KV heads of the K RoPE
        rows; o_proj copied; q/k/v biases onto q_b_proj and kv_b_proj. rope_init="random" leaves both RoPE parts
        at their init. Returns the kept singular-value energies {"q_energy", "kv_energy"}."""
        q, q_bias, rows, k_rope, kv, kv_bias = attention_targets(w, self.nope, self.rope, rope_init)
        stats = {}
        if self.q_lora_rank is None:
            put(self.q_proj.weight, q, rows)
            q_b = self.q_proj
        else:
            A, B, S = low_rank(q, self.q_lora_rank)
            put(self.q_a_proj.weight, A)
            put(self.q_b_proj.weight, B, rows)
            stats["q_energy"] = kept_energy(S, self.q_lora_rank)
            q_b = self.q_b_proj
        if q_bias is not None and q_b.bias is not None:
            put(q_b.bias, q_bias, rows)
        r = self.kv_lora_rank
        A, B, S = low_rank(kv, r)
        put(self.kv_a_proj_with_mqa.weight, A, slice(0, r))
        put(self.kv_b_proj.weight, B)
        stats["kv_energy"] = kept_energy(S, r)
        if kv_bias is not None and self.kv_b_proj.bias is not None:
            put(self.kv_b_proj.bias, kv_bias)
        if k_rope is not None:
            put(self.kv_a_proj_with_mqa.weight, k_rope, slice(r, r + self.rope))
        put(self.o_proj.weight, w.o)
        return stats

    def project_q(self, x):
        if self.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x, *, rope, state=None, attention_mask=None):
        """rope: (cos, sin) or (cos, sin, temperature): unscaled RoPE tables and the factor on every logit
        (HyloModel.rope_tables: YaRN's mscale squared)."""
        B, T, _ = x.shape
        H, Hkv = self.num_heads, self.num_kv_heads
        cos, sin = rope[:2]
        scale = self.scale * (rope[2] if len(rope) > 2 else 1.0)
        q = self.project_q(x).view(B, T, H, self.nope + self.rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rotary(q_rope, cos, sin)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c = self.kv_a_layernorm(c)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin).squeeze(2)
        if state is not None and state.static and T == 1:
            if attention_mask is not None:
                raise ValueError("the static (CUDA-graph) decode path takes no attention_mask: rows are unpadded")
            state.write_at_position(c, k_rope)
            o = self.decode(q_nope, q_rope, state.kv, state.position + 1, scale)
            return self.o_proj(o.reshape(B, T, H * self.v_dim))
        past = 0
        if state is not None:
            past = state.length
            state.append(c, k_rope)
        if past > 0 and T <= ABSORB_MAX_TOKENS:
            allowed = causal_mask(T, past, attention_mask, x.device)[:, 0]  # [B|1, T, S]
            o = self.absorbed(q_nope, q_rope, state.filled(), allowed, scale)
        else:
            if state is not None:
                c, k_rope = state.latent, state.k_rope
            o = self.expanded(q_nope, q_rope, c, k_rope, past, attention_mask, scale)
        return self.o_proj(o.reshape(B, T, H * self.v_dim))

    def expanded(self, q_nope, q_rope, c, k_rope, past, attention_mask, scale):
        """Expand the latent to per-KV-head K/V ([B, S, Hkv, nope + v]) and run fused causal attention
        (prefill_attention: flash with GQA and the causal diagonal at the bottom right on CUDA)."""
        B, S, _ = c.shape
        Hkv = self.num_kv_heads
        kv = self.kv_b_proj(c).view(B, S, Hkv, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(B, S, Hkv, self.rope)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1).transpose(1, 2)
        o = prefill_attention(q, k.transpose(1, 2), v.transpose(1, 2), past, attention_mask, scale=scale)
        return o.transpose(1, 2)

    def decode(self, q_nope, q_rope, kv, length, scale):
        """One token [B, 1, H, *] over the buffer kv [B, S, r + rope], rows < length (a device tensor) visible:
        ops.mla_decode (split-K Triton kernel on CUDA, its PyTorch reference elsewhere) in the absorbed form
        q_lat_h = q_nope_h W_kb^g, o_h = W_vb^g o_lat_h (+ v bias), g = h // (H / Hkv)."""
        B, T, H, _ = q_nope.shape
        q_lat = self._absorb_q(q_nope)  # [B, H, T, r]
        q_cat = torch.cat([q_lat, q_rope.transpose(1, 2).to(q_lat.dtype)], dim=-1).to(kv.dtype)
        o_lat = mla_decode(q_cat.view(B, H, -1), kv, length, self.kv_lora_rank, scale,
                           backend=getattr(self, "decode_backend", "auto"))
        return self._unabsorb_o(o_lat.view(B, H, T, -1)).to(q_nope.dtype)

    def _absorb_q(self, q_nope):
        """q_nope [B, T, H, nope] -> q_nope W_kb per KV group [B, H, T, r], without repeating W_kb per head."""
        B, T, H, _ = q_nope.shape
        Hkv = self.num_kv_heads
        w_k = self.kv_b_proj.weight.view(Hkv, self.nope + self.v_dim, -1)[:, : self.nope]
        q = torch.einsum("btgjn,gnr->bgjtr", q_nope.view(B, T, Hkv, H // Hkv, self.nope), w_k.to(q_nope.dtype))
        return q.reshape(B, H, T, -1)

    def _unabsorb_o(self, o_lat):
        """o_lat [B, H, T, r] -> W_vb per KV group (+ the v bias) [B, T, H, v]."""
        B, H, T, r = o_lat.shape
        Hkv = self.num_kv_heads
        w_v = self.kv_b_proj.weight.view(Hkv, self.nope + self.v_dim, r)[:, self.nope:]
        o = torch.einsum("bgjtr,gvr->btgjv", o_lat.view(B, Hkv, H // Hkv, T, r), w_v.to(o_lat.dtype))
        if self.kv_b_proj.bias is not None:
            o = o + self.kv_b_proj.bias.view(Hkv, -1)[:, None, self.nope:].to(o.dtype)
        return o.reshape(B, T, H, self.v_dim)

    def absorbed(self, q_nope, q_rope, kv, allowed, scale):
        """Attention in latent space over kv = [c | k_rope] [B, S, r + rope], never expanding K/V:
        scores_{h,t,s} = (q_nope_h W_kb^g) . c_s + q_rope_h . k_rope_s with g = h // (H / Hkv);
        out_h = W_vb^g (sum_s p_hts c_s) (+ v bias, since p sums to 1). All heads share the one latent "head",
        so the scores are one [B, H*T, r+rope] x [B, r+rope, S] matrix product (reads the cache once) and the
        values another. allowed: bool [B|1, T, S] (True = visible) or [1, 1, S] (static decode)."""
        B, T, H, _ = q_nope.shape
        Hkv, rep, r = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(Hkv, self.nope + self.v_dim, r)
        w_k = w[:, : self.nope].repeat_interleave(rep, dim=0)  # [H, nope, r]
        w_v = w[:, self.nope:].repeat_interleave(rep, dim=0)  # [H, v, r]
        # A key bias adds q.b_k to every score of a query: softmax ignores it, so only the value bias remains.
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, w_k)
        q_cat = torch.cat([q_lat, q_rope.transpose(1, 2)], dim=-1).to(kv.dtype)  # [B, H, T, r + rope]
        S = kv.shape[1]
        scores = torch.matmul(q_cat.reshape(B, H * T, -1) * scale, kv.transpose(1, 2))  # [B, H*T, S]
        scores = scores.view(B, H, T, S).masked_fill(~allowed[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1).view(B, H * T, S)
        o_lat = torch.matmul(p, kv[..., :r]).view(B, H, T, r)
        o = torch.einsum("bhtr,hvr->bthv", o_lat, w_v.to(o_lat.dtype))
        if self.kv_b_proj.bias is not None:
            o = o + self.kv_b_proj.bias.view(Hkv, -1)[:, self.nope:].repeat_interleave(rep, dim=0)
        return o.to(q_nope.dtype)


def rope_pairs(head_dim: int, rope: int) -> list[int]:
    """The base head's frequency pairs an MLA of qk_rope_head_dim `rope` keeps: 0, s, 2s, ... (s = hd/rope), so
    the kept frequencies span the base's range from the fastest down. Stored as config.mla_rope_pairs: the MLA's
    Rotary then rotates pair i at exactly the base's inv_freq[pairs[i]] (whatever the rope type)."""
    return list(range(0, head_dim // 2, head_dim // rope))[: rope // 2]


def rope_dim_split(head_dim: int, rope: int, nope: int) -> tuple[list[int], list[int]]:
    """Base head dims feeding MLA's (NoPE, RoPE) parts. Half-split RoPE rotates dims j and j + hd/2 at the
    base's inv_freq[j]; the RoPE rows are the kept pairs (rope_pairs) laid out [firsts | seconds], as MLA's
    Rotary lays out its pairs; NoPE = the first `nope` other dims."""
    half = head_dim // 2
    pairs = rope_pairs(head_dim, rope)
    rope_src = pairs + [j + half for j in pairs]
    taken = set(rope_src)
    return [d for d in range(head_dim) if d not in taken][:nope], rope_src


def attention_targets(w, nope: int, rope: int, rope_init: str):
    """What MLA.from_attention factorises, from base attention weights `w`: (query rows [H*len(src), D] scaled
    by sqrt((nope + rope) / hd) so MLA's softmax scale equals the base's, their bias, their row positions in
    q_b_proj's [H, nope + rope] rows, the shared RoPE key rows or None (rope_init="random"), the stacked
    [K_nope; V] rows per KV head, their bias)."""
    H, Hkv, hd, D = w.H, w.Hkv, w.hd, w.q.shape[1]
    nope_src, rope_src = rope_dim_split(hd, rope, nope)
    src = nope_src + (rope_src if rope_init == "filled" else [])
    qk = nope + rope
    scale = math.sqrt(qk / hd)
    rows = torch.tensor([h * qk + j for h in range(H) for j in range(len(src))])
    q = w.q.view(H, hd, D)[:, src].reshape(-1, D) * scale
    q_bias = None if w.q_bias is None else w.q_bias.view(H, hd)[:, src].reshape(-1) * scale
    k = w.k.view(Hkv, hd, D)
    k_rope = k[:, rope_src].mean(0) if rope_init == "filled" else None
    kv = torch.cat([k[:, nope_src], w.v.view(Hkv, hd, D)], dim=1).reshape(-1, D)
    kv_bias = None
    if w.k_bias is not None:
        kv_bias = torch.cat([w.k_bias.view(Hkv, hd)[:, nope_src], w.v_bias.view(Hkv, hd)], dim=1).reshape(-1)
    return q, q_bias, rows, k_rope, kv, kv_bias


def put(param, value, idx=slice(None)):
    param.data[idx] = value.to(param.dtype)
