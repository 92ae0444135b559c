"""One MLA decode step over the latent cache, absorbed form: a Triton split-K (flash-decoding) kernel and its
PyTorch reference.

q [B, H, R + E] is the absorbed query (q_nope W_kb | q_rope, R = kv_lora_rank, E = qk_rope_head_dim); kv
[B, S, R + E] is the cache ([c | k_rope] per row); rows s < length are visible (length: int or a device long
tensor [1] or [B], so a CUDA graph can replay the step as the cache fills). All heads share the one latent "key":

    score_{b,h,s} = scale * q_{b,h} . kv_{b,s}          (s < length_b)
    o_{b,h}      = sum_s softmax_s(score_{b,h,:}) c_{b,s}      -> [B, H, R]

The caller un-absorbs o with W_vb. The kernel splits the S rows of the buffer into P splits of `split` rows
(grid: batch x head blocks x splits, P ~ 2 programs per SM so the cache is read once at full bandwidth); split
p keeps its running max m_p, sum l_p = sum_s exp(score - m_p) and o_p = sum_s exp(score - m_p) c_s. A second
kernel merges them: M = max_p m_p, o = sum_p exp(m_p - M) o_p / sum_p exp(m_p - M) l_p. Splits past `length`
do nothing (m = -inf, l = 0), so shapes depend on the buffer's capacity only.
"""

from __future__ import annotations

import functools
import os

import torch

MAX_SPLITS = 1024


def mla_decode_reference(q, kv, length, rank: int, scale: float):
    """Masked softmax over the whole buffer: scores in kv's dtype (the matmul reads the cache once), softmax in
    float32 or wider; returns o [B, H, rank] in kv's dtype."""
    S = kv.shape[1]
    scores = torch.matmul(q.to(kv.dtype) * scale, kv.transpose(1, 2))  # [B, H, S]
    scores = scores.to(torch.promote_types(kv.dtype, torch.float32))
    length = torch.as_tensor(length, device=kv.device).reshape(-1, 1, 1)
    visible = torch.arange(S, device=kv.device) < length
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.matmul(p.to(kv.dtype), kv[..., :rank])


def triton_available() -> bool:
    return _triton_error() is None


@functools.lru_cache(maxsize=None)
def _triton_error():
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def use_triton(q, kv) -> bool:
    """The kernel runs on CUDA tensors in 16- or 32-bit floats when triton imports (TRITON_INTERPRET=1 also runs
    it on CPU tensors); float64 stays on the reference."""
    if not triton_available() or kv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return (q.is_cuda and kv.is_cuda) or os.environ.get("TRITON_INTERPRET") == "1"


def mla_decode(q, kv, length, rank: int, scale: float, *, backend: str = "auto"):
    """backend "auto": the Triton kernel where use_triton(), else the reference; "torch": the reference;
    "triton": the kernel (raises if it cannot run)."""
    if backend == "torch" or (backend == "auto" and not use_triton(q, kv)):
        return mla_decode_reference(q, kv, length, rank, scale)
    return mla_decode_triton(q, kv, length, rank, scale)


def _pow2(n: int, least: int = 16) -> int:
    return max(least, 1 << (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def _num_sms(device_index) -> int:
    if device_index is None:
        return 8
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan(B: int, H: int, S: int, rank: int, rope: int, device) -> dict:
    """Block shapes and the split length for a buffer of S rows (fixed per buffer: graph-safe)."""
    RP, EP = _pow2(rank), _pow2(rope)
    block_h = min(_pow2(H), 32 if RP <= 256 else 16)
    block_n = 64 if RP <= 256 else 32
    head_blocks = -(-H // block_h)
    sms = _num_sms(device.index if device.type == "cuda" else None)
    want = max(1, (2 * sms) // (B * head_blocks))
    split = max(4 * block_n, -(-S // want))
    split = -(-split // block_n) * block_n
    while -(-S // split) > MAX_SPLITS:
        split *= 2
    return dict(RP=RP, EP=EP, BLOCK_H=block_h, BLOCK_N=block_n, head_blocks=head_blocks, split=split,
                splits=-(-S // split), num_warps=4 if RP * block_h <= 128 * 32 else 8)


def mla_decode_triton(q, kv, length, rank: int, scale: float, *, split: int | None = None):
    """The kernel; `split` (a multiple of the plan's BLOCK_N) overrides the planned rows per split (tests)."""
    split_kernel, combine_kernel = _kernels()
    B, H, W = q.shape
    S, rope = kv.shape[1], kv.shape[2] - rank
    if kv.shape[2] != W or kv.shape[0] != B:
        raise ValueError(f"q {tuple(q.shape)} and kv {tuple(kv.shape)} disagree on batch or width")
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    q = q.to(kv.dtype).contiguous()
    if not isinstance(length, torch.Tensor):
        length = torch.full((1,), int(length), dtype=torch.long, device=kv.device)
    length = length.reshape(-1)
    p = plan(B, H, S, rank, rope, kv.device)
    if split is not None:
        p.update(split=split, splits=-(-S // split))
    # Triton's interpreter (3.9) multiplies bf16 tiles in tl.dot as raw bits: upcast the tiles there.
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    P = p["splits"]
    o_part = torch.empty(B, H, P, rank, dtype=torch.float32, device=kv.device)
    ml_part = torch.empty(B, H, P, 2, dtype=torch.float32, device=kv.device)
    out = torch.empty(B, H, rank, dtype=kv.dtype, device=kv.device)
    split_kernel[(B * p["head_blocks"], P)](
        q, kv, length, o_part, ml_part,
        q.stride(0), q.stride(1), kv.stride(0), kv.stride(1),
        H, p["split"], scale * 1.4426950408889634, 0 if length.numel() == 1 else 1,
        R=rank, RP=p["RP"], E=rope, EP=p["EP"], BLOCK_H=p["BLOCK_H"], BLOCK_N=p["BLOCK_N"],
        PRECISION="ieee" if kv.dtype == torch.float32 or interpret else "tf32", UPCAST=interpret,
        num_warps=p["num_warps"], num_stages=2)
    combine_kernel[(B * H,)](
        o_part, ml_part, out, P,
        R=rank, RP=p["RP"], SP=_pow2(P), BLOCK_S=16, num_warps=4)
    return out


@functools.lru_cache(maxsize=None)
def _kernels():
    """Define the two kernels on first use, so that importing this module never imports triton."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def split_kernel(Q, KV, LEN, O_part, ML_part, sqb, sqh, skb, sks, H, split, scale_log2e, len_stride,
                     R: tl.constexpr, RP: tl.constexpr, E: tl.constexpr, EP: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
        head_blocks = tl.cdiv(H, BLOCK_H)
        b, hb = pid_bh // head_blocks, pid_bh % head_blocks
        P = tl.num_programs(1)
        length = tl.load(LEN + b * len_stride).to(tl.int32)
        start = pid_s * split
        end = tl.minimum(start + split, length)
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        r = tl.arange(0, RP)
        e = tl.arange(0, EP)
        hmask, rmask, emask = h < H, r < R, e < E
        q_row = Q + b.to(tl.int64) * sqb + h[:, None] * sqh
        q_lat = tl.load(q_row + r[None, :], mask=hmask[:, None] & rmask[None, :], other=0.0)
        q_rope = tl.load(q_row + R + e[None, :], mask=hmask[:, None] & emask[None, :], other=0.0)
        if UPCAST:
            q_lat, q_rope = q_lat.to(tl.float32), q_rope.to(tl.float32)
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, RP], tl.float32)
        kv_base = KV + b.to(tl.int64) * skb
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            row = kv_base + n.to(tl.int64)[:, None] * sks
            c = tl.load(row + r[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0)
            kr = tl.load(row + R + e[None, :], mask=nmask[:, None] & emask[None, :], other=0.0)
            if UPCAST:
                c, kr = c.to(tl.float32), kr.to(tl.float32)
            s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
            s += tl.dot(q_rope, tl.trans(kr), input_precision=PRECISION)
            s = tl.where(nmask[None, :], s * scale_log2e, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
            m = m_new
        part = (b.to(tl.int64) * H + h) * P + pid_s  # [BLOCK_H] row of [B, H, P]
        tl.store(O_part + part[:, None] * R + r[None, :], acc, mask=hmask[:, None] & rmask[None, :])
        tl.store(ML_part + part * 2, m, mask=hmask)
        tl.store(ML_part + part * 2 + 1, l, mask=hmask)

    @triton.jit
    def combine_kernel(O_part, ML_part, Out, P, R: tl.constexpr, RP: tl.constexpr, SP: tl.constexpr,
                       BLOCK_S: tl.constexpr):
        bh = tl.program_id(0).to(tl.int64)
        s = tl.arange(0, SP)
        m = tl.load(ML_part + (bh * P + s) * 2, mask=s < P, other=float("-inf"))
        l = tl.load(ML_part + (bh * P + s) * 2 + 1, mask=s < P, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(l > 0, tl.exp2(m - m_max), 0.0)
        denom = tl.sum(w * l, 0)
        r = tl.arange(0, RP)
        acc = tl.zeros([RP], tl.float32)
        for s0 in range(0, P, BLOCK_S):
            sb = s0 + tl.arange(0, BLOCK_S)
            mb = tl.load(ML_part + (bh * P + sb) * 2, mask=sb < P, other=float("-inf"))
            lb = tl.load(ML_part + (bh * P + sb) * 2 + 1, mask=sb < P, other=0.0)
            wb = tl.where(lb > 0, tl.exp2(mb - m_max), 0.0)
            o = tl.load(O_part + (bh * P + sb)[:, None] * R + r[None, :], mask=(sb < P)[:, None] & (r < R)[None, :],
                        other=0.0)
            acc += tl.sum(o * wb[:, None], 0)
        tl.store(Out + bh * R + r, (acc / denom).to(Out.dtype.element_ty), mask=r < R)

    return split_kernel, combine_kernel
