"""Distillation losses: KL between next-token distributions (from logits, chunked, or logit-free from
final hidden states and LM-head weights), next-token cross-entropy, the stage-2 objectives built from them
(kd_loss, hidden_kd_loss; fused_linear_kd does both in one pass), and Enhanced-ILD (method.md 5).

Every KL variant follows the same conventions, so they agree in value and in gradient:
- p = softmax(z / temperature), and the KL is multiplied by temperature**2 (Hinton et al. 2015: keeps
  gradient sizes comparable across temperatures; at temperature 1 it is the plain KL).
- direction "forward" = KL(teacher || student) = sum_v p_t (log p_t - log p_s), the paper's choice
  (mass-covering); "reverse" = KL(student || teacher) = sum_v p_s (log p_s - log p_t) (mode-seeking).
- Reduction: mean over valid tokens. `mask` has the inputs' leading shape (usually [B, T]), bool or
  0/1, nonzero = valid; None = all valid; no valid token gives 0.
- Positions are aligned: student and teacher at position t both predict token t+1; nothing is shifted.
- The teacher is a target: its inputs are detached everywhere and never receive a gradient.
- Arithmetic in float32 whatever the input dtype (bf16 in, float32 loss out; one measured exception
  in hidden_state_kl_div's backward on CUDA, see there); float64 if an input is float64 (the tests).

Memory at long context (T x V logits are the problem, method.md section 5):
- kl_div: holds both models' full logits.
- chunked_kl_div / fused_linear_kd: blocks of <= chunk_size tokens x V, loss and gradients in one pass
  (KL and CE together; the fastest; ~3 GiB at V = 128256).
- hidden_state_kl_div: tiles of token_chunk x vocab_chunk, hand-written backward; never T x V.
- topk_kd_loss: the teacher as its top-k ids and log-probs per token (teacher_cache.py), the student in
  blocks of chunk_size tokens x V as fused_linear_kd; forward KL on the teacher's top-k support.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

DIRECTIONS = ("forward", "reverse")
BACKENDS = ("auto", "torch", "fla")


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_kl_args(direction, temperature):
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` [...] over entries where mask [...] is nonzero; 0 when none is."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(values.shape)}")
    valid = mask != 0
    return values[valid].sum() / valid.sum().clamp_min(1)


def _valid_rows(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None):
    """[..., Ds], [..., Dt] -> the valid tokens as rows [N, Ds], [N, Dt] (teacher detached)."""
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"token shapes differ: student {tuple(student_hidden.shape)}, "
                         f"teacher {tuple(teacher_hidden.shape)}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    if mask is None:
        return hs, ht
    if mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(student_hidden.shape[:-1])}")
    valid = mask.reshape(-1) != 0
    return hs[valid], ht[valid]


def _token_kl(student_logits: Tensor, teacher_logits: Tensor, reverse: bool, temperature: float) -> Tensor:
    """Per-token KL [...] from logits [..., V] already in the compute dtype (no temperature**2)."""
    ls = F.log_softmax(student_logits / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits / temperature, dim=-1)
    if reverse:
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def kl_div(student_logits: Tensor, teacher_logits: Tensor, *, direction: str = "forward",
           temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """T^2 * mean_t KL_t, KL_t = sum_v p_t (log p_t - log p_s) (forward) or sum_v p_s (log p_s - log p_t) (reverse).

    student_logits, teacher_logits: [..., V]; mask: [...]. Returns a 0-d float32 tensor.
    """
    _check_kl_args(direction, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    kl = _token_kl(student_logits.to(dtype), teacher_logits.detach().to(dtype), direction == "reverse", temperature)
    return _masked_mean(kl, mask) * temperature**2


def chunked_kl_div(student_hidden: Tensor, teacher_hidden: Tensor, student_head_weight: Tensor,
                   teacher_head_weight: Tensor, *, chunk_size: int = 4096, direction: str = "forward",
                   temperature: float = 1.0, mask: Tensor | None = None,
                   student_head_bias: Tensor | None = None, teacher_head_bias: Tensor | None = None,
                   final_logit_softcapping: float | None = None) -> Tensor:
    """kl_div(h_s W_s^T + b_s, h_t W_t^T + b_t) over token chunks: fused_linear_kd with the KL term alone.

    student_hidden [..., Ds], teacher_hidden [..., Dt] (final, normed hidden states), head weights
    [V, Ds] and [V, Dt], optional biases [V]; mask [...]. final_logit_softcapping c (Gemma-style):
    z <- c * tanh(z / c) on both models before temperature. Memory and speed: see fused_linear_kd.
    """
    total, _ = fused_linear_kd(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight,
                               chunk_size=chunk_size, direction=direction, temperature=temperature, mask=mask,
                               student_head_bias=student_head_bias, teacher_head_bias=teacher_head_bias,
                               final_logit_softcapping=final_logit_softcapping)
    return total


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, chunk_size: int = 4096,
                               ignore_index: int = -100, bias: Tensor | None = None,
                               final_logit_softcapping: float | None = None, backend: str = "auto") -> Tensor:
    """cross_entropy(hidden @ weight.T + bias, labels) without the [T, V] logits.

    hidden [..., D], weight [V, D], labels [...] aligned with hidden (the caller shifts). backend "auto":
    Liger-Kernel's fused linear cross-entropy on CUDA where it imports (measured faster and smaller than ours on
    an H100: 34 vs 51 ms, 2.7 vs 4.7 GiB at 8K tokens, V = 128256; benchmarks/distill_gpu.py), else fused_linear_kd
    with the CE term alone; "torch": always ours; "liger": Liger or a clear error.
    """
    if backend not in ("auto", "torch", "liger"):
        raise ValueError(f"backend={backend!r}; choose one of auto, torch, liger")
    why = None if backend == "torch" else _liger_mismatch(hidden)
    if backend == "liger" and why:
        raise RuntimeError(f"backend='liger' cannot run here: {why}; use backend='auto' or 'torch'")
    if backend != "torch" and why is None:
        return _liger_cross_entropy(hidden, weight, labels, ignore_index, bias, final_logit_softcapping)
    total, _ = fused_linear_kd(hidden, weight, labels=labels, kl_weight=0.0, ce_weight=1.0, chunk_size=chunk_size,
                               ignore_index=ignore_index, student_head_bias=bias,
                               final_logit_softcapping=final_logit_softcapping)
    return total


@functools.cache
def _liger_flce():
    """Liger-Kernel's LigerFusedLinearCrossEntropyLoss, or None where it does not import (CPU installs)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:  # no triton, or a broken one
        return None
    return LigerFusedLinearCrossEntropyLoss


def _liger_mismatch(hidden: Tensor) -> str | None:
    if not hidden.is_cuda:
        return "Liger-Kernel needs CUDA tensors"
    if hidden.dtype == torch.float64:
        return "Liger-Kernel's kernels are not for float64"
    if _liger_flce() is None:
        return "liger-kernel does not import (pip install liger-kernel)"
    return None


def _liger_cross_entropy(hidden, weight, labels, ignore_index, bias, softcap):
    """Mean over the labels that are not ignore_index, float32, as ours (0 when every label is ignored)."""
    if bool((labels == ignore_index).all()):
        return hidden.sum() * 0.0
    loss_fn = _liger_flce()(ignore_index=ignore_index, softcap=softcap)
    h = hidden.reshape(-1, hidden.shape[-1])
    loss = loss_fn(weight.to(h.dtype), h, labels.reshape(-1), None if bias is None else bias.to(h.dtype))
    return loss.float()


# rows of one [rows, V] float32 block: 2**27 elements = 0.5 GiB (1046 tokens at V = 128256)
FUSED_BLOCK_ELEMENTS = 2**27


def fused_linear_kd(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor | None = None,
                    teacher_head_weight: Tensor | None = None, labels: Tensor | None = None, *,
                    kl_weight: float = 1.0, ce_weight: float = 0.0, direction: str = "forward",
                    temperature: float = 1.0, mask: Tensor | None = None, chunk_size: int = 4096,
                    ignore_index: int = -100, student_head_bias: Tensor | None = None,
                    teacher_head_bias: Tensor | None = None,
                    final_logit_softcapping: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """kl_weight * kl_div(z_s, z_t) + ce_weight * cross_entropy(z_s, labels), z = h W^T + b, logit-free.

    One pass over blocks of at most chunk_size tokens (and FUSED_BLOCK_ELEMENTS / V): each block's logits
    of both models are made once, the loss and its gradients w.r.t. the student's hidden states, head
    weight and bias are computed at once (grad of the KL: (p_s - p_t) / T forward, p_s (log p_s - log p_t
    - KL) / T reverse; of the CE: p_s - onehot(label)) and kept; backward only scales them. So 4 products
    per block (2 logits, 2 gradients), not the 6 of recompute-in-backward, and nothing T x V is held:
    peak ~ 5 float32 blocks of rows x V plus float32 grads of hidden states [T, Ds] and head [V, Ds].
    The KL is the mean over tokens where mask != 0, the CE over labels != ignore_index (kd_loss's
    conventions); either term is skipped at weight 0. bf16 inputs on CUDA multiply on tensor cores with
    float32 accumulation; the gradient products take the block's dz rounded to the input dtype.
    Returns (total, parts) with parts {"kl", "ce"} detached, as kd_loss.
    """
    if kl_weight:
        _check_kl_args(direction, temperature)
        if teacher_hidden is None or teacher_head_weight is None:
            raise ValueError("kl_weight > 0 needs teacher_hidden and teacher_head_weight")
        if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
            raise ValueError(f"token shapes differ: student {tuple(student_hidden.shape)}, "
                             f"teacher {tuple(teacher_hidden.shape)}")
        if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
            raise ValueError(f"vocabularies differ: {student_head_weight.shape[0]} vs {teacher_head_weight.shape[0]}")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hs.shape[0]
    ht = wt = bt = None
    if kl_weight:
        ht = teacher_hidden.detach().reshape(n, -1)
        wt = teacher_head_weight.detach()
        bt = None if teacher_head_bias is None else teacher_head_bias.detach()
    kl_rows, y = _token_rows(student_hidden, mask if kl_weight else None, labels if ce_weight else None)
    dtype = _compute_dtype(student_hidden, teacher_hidden, student_head_weight, teacher_head_weight)
    rows = max(1, min(chunk_size, FUSED_BLOCK_ELEMENTS // student_head_weight.shape[0]))
    opts = (float(kl_weight), float(ce_weight), direction == "reverse", float(temperature), rows,
            final_logit_softcapping or None, ignore_index, dtype)
    total, kl, ce = _FusedLinearKD.apply(hs, student_head_weight, student_head_bias, ht, wt, bt, kl_rows, y, opts)
    return total, {name: v for name, v, w in (("kl", kl, kl_weight), ("ce", ce, ce_weight)) if w}


def _token_rows(student_hidden: Tensor, mask: Tensor | None, labels: Tensor | None):
    """The fused losses' flat per-token inputs: (mask != 0 as [n] bool or None, labels as [n] or None), each
    checked against the student's token shape."""
    lead = student_hidden.shape[:-1]
    kl_rows = y = None
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} != token shape {tuple(lead)}")
        kl_rows = mask.reshape(-1) != 0
    if labels is not None:
        if labels.shape != lead:
            raise ValueError(f"hidden {tuple(student_hidden.shape)} and labels {tuple(labels.shape)} are not aligned")
        y = labels.reshape(-1)
    return kl_rows, y


class _FusedLinearKD(torch.autograd.Function):
    """Loss and gradients in one forward (the loss is a scalar, so backward only scales the kept gradients)."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, kl_rows, y, opts):
        kl_weight, ce_weight, reverse, temp, rows, cap, ignore_index, dtype = opts
        n, dev = hs.shape[0], hs.device
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        want = want_h or want_w or want_b
        dz_dtype = hs.dtype if _fast_half(hs, ws, dtype) else dtype
        dhs = torch.zeros(hs.shape, dtype=dtype, device=dev) if want_h else None
        dws = torch.zeros(ws.shape, dtype=dtype, device=dev) if want_w else None
        dbs = torch.zeros(ws.shape[0], dtype=dtype, device=dev) if want_b else None
        kl_sum = torch.zeros((), dtype=dtype, device=dev)
        ce_sum = torch.zeros((), dtype=dtype, device=dev)
        n_kl = (kl_rows.sum() if kl_rows is not None else torch.tensor(n, device=dev)).clamp_min(1).to(dtype)
        n_ce = (y != ignore_index).sum().clamp_min(1).to(dtype) if ce_weight else None

        def logits(h, w, b):
            z = _mm(h, w.T, dtype)
            if b is not None:
                z += b.to(dtype)
            if cap:
                t = torch.tanh(z / cap)
                return t.mul(cap), t
            return z, None

        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            zs, ts = logits(hs[i0:i1], ws, bs)
            dz = None
            if kl_weight:
                zt, _ = logits(ht[i0:i1], wt, bt)
                ls = torch.log_softmax(zs / temp if temp != 1 else zs, dim=-1)
                lt = torch.log_softmax(zt.div_(temp) if temp != 1 else zt, dim=-1)
                del zt
                valid = None if kl_rows is None else kl_rows[i0:i1].to(dtype)
                if reverse:
                    ps = ls.exp()
                    diff = ls.sub_(lt)  # log p_s - log p_t
                    del lt, ls
                    tok = (ps * diff).sum(-1)
                    if want:
                        dz = ps.mul_(diff.sub_(tok[:, None]))
                    del diff
                else:
                    pt = lt.exp()
                    tok = (pt * (lt - ls)).sum(-1)
                    del lt
                    if want:
                        dz = ls.exp_().sub_(pt)
                    del pt, ls
                if valid is not None:
                    tok = tok * valid
                kl_sum += tok.sum()
                if dz is not None:
                    coef = kl_weight * temp / n_kl  # d(T^2 KL / n) / dz_s = T (.) / n
                    dz = dz.mul_(coef if valid is None else coef * valid[:, None])
            if ce_weight:
                part, dce = _ce_block(zs, y[i0:i1], ignore_index, ce_weight / n_ce, dtype, want)
                ce_sum += part
                if dce is not None:
                    dz = dce if dz is None else dz.add_(dce)
                    del dce
            del zs
            if dz is None:
                continue
            if ts is not None:
                dz = dz.mul_(1 - ts.square())
            if want_b:
                dbs += dz.sum(0)
            _block_grads(dz.to(dz_dtype), hs, ws, i0, i1, dhs, dws, dtype)
        total, kl, ce = _totals(kl_sum, ce_sum, n_kl, n_ce, kl_weight, ce_weight, temp)
        ctx.save_for_backward(dhs, dws, dbs)
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        ctx.mark_non_differentiable(kl, ce)
        return total, kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _kl, _ce):
        dhs, dws, dbs = ctx.saved_tensors
        out = [None if d is None else (d * grad.to(d.dtype)).to(dt) for d, dt in zip((dhs, dws, dbs), ctx.dtypes)]
        return (*out, None, None, None, None, None, None)


def _block_grads(dz: Tensor, hs: Tensor, ws: Tensor, i0: int, i1: int, dhs, dws, dtype):
    """Accumulate a block's logit gradient dz [rows, V] into the hidden-state rows i0:i1 and the head weight."""
    if dhs is not None:
        dhs[i0:i1] = _mm(dz, ws, dtype)
    if dws is not None:
        dws += _mm(dz.T, hs[i0:i1], dtype)


def _totals(kl_sum: Tensor, ce_sum: Tensor, n_kl: Tensor, n_ce, kl_weight, ce_weight, temp):
    """(total, kl, ce) of the fused losses from their sums: kl = T^2 mean KL, ce = mean CE (0 at weight 0)."""
    kl = kl_sum * (temp**2) / n_kl
    ce = ce_sum / n_ce if ce_weight else torch.zeros_like(kl_sum)
    total = (kl_weight * kl if kl_weight else 0) + (ce_weight * ce if ce_weight else 0)
    return torch.as_tensor(total, dtype=kl_sum.dtype, device=kl_sum.device), kl, ce


def _ce_block(zs: Tensor, labels: Tensor, ignore_index: int, scale, dtype, want: bool):
    """A block's cross-entropy summed over the rows whose label is not ignore_index, and (want) its gradient
    w.r.t. the logits zs times `scale`: scale (softmax(zs) - onehot(label)) on those rows, else None."""
    ok = labels != ignore_index
    lse = torch.logsumexp(zs, dim=-1)
    picked = zs.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    total = ((lse - picked) * ok).sum()
    if not want:
        return total, None
    w = scale * ok.to(dtype)[:, None]
    dce = torch.exp(zs - lse[:, None]).mul_(w)
    return total, dce.scatter_add_(1, labels.clamp_min(0)[:, None], -w)


def _online_step(m: Tensor, s: Tensor, z: Tensor):
    """Online log-sum-exp: running max m [C] and sum s [C] of exp(z - m), updated with a tile z [C, Vc].

    Returns the new m, s, the factor exp(m_old - m_new) [C] and exp(z - m_new) [C, Vc].
    """
    m_new = torch.maximum(m, z.amax(-1))
    rescale = torch.exp(m - m_new)
    e = torch.exp(z - m_new[:, None])
    return m_new, s * rescale + e.sum(-1), rescale, e


@functools.cache
def _half_mm_works(device: torch.device) -> bool:
    """torch.mm(bf16, bf16, out_dtype=float32) exists here (torch >= 2.8 on CUDA)."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _fast_half(a: Tensor, b: Tensor, dtype: torch.dtype) -> bool:
    return (dtype == torch.float32 and a.is_cuda and a.dtype == b.dtype
            and a.dtype in (torch.bfloat16, torch.float16) and _half_mm_works(a.device))


def _mm(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a [M, K] @ b [K, N] accumulated and returned in `dtype` (float32, or float64 in tests).

    bf16/fp16 operands on CUDA multiply as they are on tensor cores with float32 accumulation and
    output: the numbers of an upcast (products of halves are exact in float32), ~13x faster on H100.
    """
    if _fast_half(a, b, dtype):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.to(dtype) @ b.to(dtype)


class _HiddenStateKL(torch.autograd.Function):
    """scale * sum_n KL_n for rows hs [N, Ds], ht [N, Dt] against heads ws [V, Ds], wt [V, Dt].

    Forward, one pass over vocabulary tiles per token chunk: online log-sum-exp of both models and an
    online expectation E_w[z_w - z_o] under the weighting model w (teacher for forward KL, student for
    reverse), so KL = E_w[z_w - z_o] - lse_w + lse_o (z already divided by the temperature).
    Saves lse_s, lse_t, KL [N]; backward recomputes each tile and applies
    dKL/dz_s = p_s - p_t (forward) or p_s (log p_s - log p_t - KL) (reverse), times 1/T.
    """

    @staticmethod
    def forward(ctx, hs, ht, ws, wt, scale, temperature, reverse, token_chunk, vocab_chunk):
        dtype = _compute_dtype(hs, ht, ws, wt)
        n, vocab = hs.shape[0], ws.shape[0]
        lse_s = torch.empty(n, dtype=dtype, device=hs.device)
        lse_t = torch.empty_like(lse_s)
        kl = torch.empty_like(lse_s)
        for i0 in range(0, n, token_chunk):
            i1 = min(i0 + token_chunk, n)
            m_s = torch.full((i1 - i0,), -torch.inf, dtype=dtype, device=hs.device)
            m_t, s_s, s_t, expect = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s), torch.zeros_like(m_s)
            for j0 in range(0, vocab, vocab_chunk):
                j1 = min(j0 + vocab_chunk, vocab)
                zs = _mm(hs[i0:i1], ws[j0:j1].T, dtype) / temperature  # [C, Vc]
                zt = _mm(ht[i0:i1], wt[j0:j1].T, dtype) / temperature
                m_s, s_s, rescale_s, e_s = _online_step(m_s, s_s, zs)
                m_t, s_t, rescale_t, e_t = _online_step(m_t, s_t, zt)
                if reverse:
                    expect = expect * rescale_s + (e_s * (zs - zt)).sum(-1)
                else:
                    expect = expect * rescale_t + (e_t * (zt - zs)).sum(-1)
            lse_s[i0:i1] = m_s + s_s.log()
            lse_t[i0:i1] = m_t + s_t.log()
            if reverse:
                kl[i0:i1] = expect / s_s - lse_s[i0:i1] + lse_t[i0:i1]
            else:
                kl[i0:i1] = expect / s_t - lse_t[i0:i1] + lse_s[i0:i1]
        ctx.save_for_backward(hs, ht, ws, wt, lse_s, lse_t, kl)
        ctx.args = (scale, temperature, reverse, token_chunk, vocab_chunk)
        return kl.sum() * scale

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        hs, ht, ws, wt, lse_s, lse_t, kl = ctx.saved_tensors
        scale, temperature, reverse, token_chunk, vocab_chunk = ctx.args
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        dtype = lse_s.dtype
        # bf16 student on CUDA: the two gradient products take dz rounded to bf16 (float32
        # accumulation); the gradient is returned in bf16 anyway, and this is 10x faster than float32
        dz_dtype = hs.dtype if _fast_half(hs, ws, dtype) else dtype
        n, vocab = hs.shape[0], ws.shape[0]
        dhs = torch.zeros(hs.shape, dtype=dtype, device=hs.device) if need_h else None
        dws = torch.zeros(ws.shape, dtype=dtype, device=ws.device) if need_w else None
        coef = grad.to(dtype) * (scale / temperature)
        for i0 in range(0, n, token_chunk):
            i1 = min(i0 + token_chunk, n)
            for j0 in range(0, vocab, vocab_chunk):
                j1 = min(j0 + vocab_chunk, vocab)
                log_ps = _mm(hs[i0:i1], ws[j0:j1].T, dtype) / temperature - lse_s[i0:i1, None]  # [C, Vc]
                log_pt = _mm(ht[i0:i1], wt[j0:j1].T, dtype) / temperature - lse_t[i0:i1, None]
                p_s = log_ps.exp()
                if reverse:
                    dz = p_s * (log_ps - log_pt - kl[i0:i1, None])
                else:
                    dz = p_s - log_pt.exp()
                dz = (dz * coef).to(dz_dtype)
                if need_h:
                    dhs[i0:i1] += _mm(dz, ws[j0:j1], dtype)
                if need_w:
                    dws[j0:j1] += _mm(dz.T, hs[i0:i1], dtype)
        return (None if dhs is None else dhs.to(hs.dtype), None,
                None if dws is None else dws.to(ws.dtype), None, None, None, None, None, None)


@functools.cache
def _fla_kl_importable() -> bool:
    if importlib.util.find_spec("fla") is None:
        return False
    try:
        from fla.modules.fused_kl_div import fused_kl_div_loss  # noqa: F401
    except Exception:  # fla without triton, or a broken triton, exposes nothing usable
        return False
    return True


def fused_kl_available(device) -> bool:
    """True where flash-linear-attention's fused KL can run: a CUDA device and `fla` importable."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and _fla_kl_importable()


def _fla_mismatch(direction, hs, ht, ws, wt) -> str | None:
    """Why fla's fused_kl_div_loss would not compute this loss, or None when it would."""
    if direction != "forward":
        return "fla computes only forward KL(teacher || student)"
    if not fused_kl_available(hs.device):
        return "needs a CUDA device and an importable flash-linear-attention (with triton)"
    if hs.dtype != ws.dtype or ht.dtype != wt.dtype:
        return "fla needs each hidden state in its head weight's dtype"
    if hs.dtype == torch.float64 or ht.dtype == torch.float64:
        return "fla's kernel is not for float64"
    if hs.shape[0] == 0:
        return "no valid token"
    return None


def _fla_kl(hs, ht, ws, wt, temperature):
    """fla's batchmean over the rows it gets = mean over valid tokens; softmax(z / T) via h / T."""
    from fla.modules.fused_kl_div import fused_kl_div_loss  # GPU only

    if temperature != 1.0:
        hs, ht = hs / temperature, ht / temperature
    loss = fused_kl_div_loss(hs.contiguous(), ht.detach().contiguous(), ws, wt.detach(), reduction="batchmean")
    return loss.float() * temperature**2


def hidden_state_kl_div(student_hidden: Tensor, teacher_hidden: Tensor, student_head_weight: Tensor,
                        teacher_head_weight: Tensor, *, token_chunk: int = 4096, vocab_chunk: int = 8192,
                        direction: str = "forward", temperature: float = 1.0, mask: Tensor | None = None,
                        backend: str = "auto") -> Tensor:
    """Logit-free kl_div(h_s W_s^T, h_t W_t^T): tiles of token_chunk x vocab_chunk, hand-written backward.

    student_hidden [..., Ds], teacher_hidden [..., Dt], head weights [V, Ds], [V, Dt]; mask [...].
    Gradients reach student_hidden and student_head_weight only (the teacher is a constant). Memory:
    a few token_chunk x vocab_chunk float32 tiles, float32 grads of the student's valid hidden states
    and head weight, three floats per token; no logits are saved, backward recomputes each tile
    (2 tile products forward, 4 backward). No head bias, no softcapping (Llama and Qwen heads have
    neither): chunked_kl_div has both.
    bf16/fp16 inputs on CUDA: logits come from half-precision products accumulated in float32 (the
    numbers of an upcast, ~13x faster); the two gradient products take dz rounded to the input dtype
    (H100, 8K tokens, V=128256: relative grad error 2.3e-3, vs 1.7e-3 for float32 math cast to bf16).

    backend "torch": the tiles above. "fla": flash-linear-attention's fused_kl_div_loss (forward KL
    only, batchmean, frozen teacher, no bias): it computes in the inputs' dtype, so bf16 inputs give bf16
    logits and ~1.5e-2 relative grad error, and holds ~(N / 8) x V logits of each model (9.8 GiB vs
    2.9 GiB here at 64K tokens, same speed). "auto": fla on CUDA where it computes the same thing in
    float32 (forward direction, float32 inputs; 1.8x faster there), else torch.
    """
    _check_kl_args(direction, temperature)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if token_chunk < 1 or vocab_chunk < 1:
        raise ValueError(f"token_chunk and vocab_chunk must be >= 1, got {token_chunk}, {vocab_chunk}")
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(f"vocabularies differ: {student_head_weight.shape[0]} vs {teacher_head_weight.shape[0]}")
    hs, ht = _valid_rows(student_hidden, teacher_hidden, mask)
    wt = teacher_head_weight.detach()
    if backend != "torch":
        why_not = _fla_mismatch(direction, hs, ht, student_head_weight, wt)
        if backend == "fla" and why_not:
            raise ValueError(f"backend='fla' cannot compute this loss: {why_not}")
        if backend == "fla" or (why_not is None and hs.dtype == torch.float32 and ht.dtype == torch.float32):
            return _fla_kl(hs, ht, student_head_weight, wt, temperature)
    scale = temperature**2 / max(hs.shape[0], 1)
    return _HiddenStateKL.apply(hs, ht, student_head_weight, wt, scale, temperature,
                                direction == "reverse", token_chunk, vocab_chunk)


def cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = -100) -> Tensor:
    """CE = mean over tokens with label != ignore_index of -log softmax(z_t)[label_t]; 0 if none.

    logits [..., V] and labels [...] are aligned: logits[..., t, :] is scored against labels[..., t].
    The caller shifts, e.g. cross_entropy(logits[:, :-1], input_ids[:, 1:]).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} are not aligned")
    z = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits))
    y = labels.reshape(-1)
    total = F.cross_entropy(z, y, ignore_index=ignore_index, reduction="sum")
    return total / (y != ignore_index).sum().clamp_min(1)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None, *,
            kl_weight: float = 1.0, ce_weight: float = 0.0, direction: str = "forward",
            temperature: float = 1.0, mask: Tensor | None = None,
            ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """kl_weight * kl_div(student, teacher) + ce_weight * cross_entropy(student, labels).

    The paper's stage 2 is kl_weight=1, ce_weight=0 (no CE term). Returns (total, parts) with parts
    {"kl": ..., "ce": ...} detached, for logging; a term with weight 0 is not computed nor listed.
    At long context use hidden_state_kl_div instead (this one holds full logits).
    """
    total = torch.zeros((), dtype=_compute_dtype(student_logits), device=student_logits.device)
    parts = {}
    if kl_weight:
        kl = kl_div(student_logits, teacher_logits, direction=direction, temperature=temperature, mask=mask)
        total, parts["kl"] = total + kl_weight * kl, kl.detach()
    if ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        ce = cross_entropy(student_logits, labels, ignore_index=ignore_index)
        total, parts["ce"] = total + ce_weight * ce, ce.detach()
    return total, parts


def hidden_kd_loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_hidden: Tensor,
                   teacher_head_weight: Tensor, labels: Tensor | None = None, *, kl_weight: float = 1.0,
                   ce_weight: float = 0.0, direction: str = "forward", temperature: float = 1.0,
                   token_chunk: int = 4096, vocab_chunk: int = 8192, backend: str = "auto",
                   ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """kd_loss from final hidden states and LM-head weights, never T x V logits at once:
    kl_weight * hidden_state_kl_div + ce_weight * fused_linear_cross_entropy (blocks of token_chunk tokens)."""
    total = torch.zeros((), dtype=_compute_dtype(student_hidden), device=student_hidden.device)
    parts = {}
    if kl_weight:
        kl = hidden_state_kl_div(student_hidden, teacher_hidden, student_head_weight, teacher_head_weight,
                                 token_chunk=token_chunk, vocab_chunk=vocab_chunk, direction=direction,
                                 temperature=temperature, backend=backend)
        total, parts["kl"] = total + kl_weight * kl, kl.detach()
    if ce_weight:
        if labels is None:
            raise ValueError("ce_weight > 0 needs labels")
        ce = fused_linear_cross_entropy(student_hidden, student_head_weight, labels, chunk_size=token_chunk,
                                        ignore_index=ignore_index)
        total, parts["ce"] = total + ce_weight * ce, ce.detach()
    return total, parts


def next_token_labels(input_ids: Tensor, ignore_index: int = -100) -> Tensor:
    """labels[..., t] = input_ids[..., t + 1]; the last position has none (ignore_index)."""
    return F.pad(input_ids[..., 1:], (0, 1), value=ignore_index)


def _token_distance(student: Tensor, teacher: Tensor, squared: bool, mask: Tensor | None) -> Tensor:
    """mean_t ||s_t - t_t||_2 (or its square) over valid tokens; s, t: [..., D]."""
    if student.shape != teacher.shape:
        raise ValueError(f"shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    dtype = _compute_dtype(student, teacher)
    diff = student.to(dtype) - teacher.detach().to(dtype)
    dist = diff.square().sum(-1) if squared else torch.linalg.vector_norm(diff, dim=-1)
    return _masked_mean(dist, mask)


def ild_loss(student_layer_out: list[Tensor], teacher_layer_out: list[Tensor],
             student_mixer_out: list[Tensor] | None = None, teacher_mixer_out: list[Tensor] | None = None,
             *, mixer_weight: float = 1.0, squared: bool = False,
             mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Enhanced ILD (method.md section 5): sum_l mean_t ||h_s - h_t||_2 + mixer_weight * mean_t ||a_s - a_t||_2.

    One tensor [B, T, D] per layer in each list: h = the decoder layer's output, a = its token
    mixer's output (attention / MLA / GDN / Mamba2, before the residual add). squared=True uses
    ||.||_2^2 (method.md section 8 leaves this open). Plain ILD: mixer_weight=0 or no mixer outputs;
    with mixer_weight=0 the mixer distance is still measured (no gradient) for logging.
    Returns (total, parts): total a 0-d float32 tensor; parts {"layer": [L], "mixer": [L]} detached
    float32 tensors of the unweighted per-layer distances ("mixer" only when mixer outputs are
    given); log them with one .tolist() (one host sync).
    """
    if len(student_layer_out) != len(teacher_layer_out) or not student_layer_out:
        raise ValueError(f"need one teacher output per student layer, got {len(student_layer_out)} "
                         f"and {len(teacher_layer_out)}")
    if (student_mixer_out is None) != (teacher_mixer_out is None):
        raise ValueError("give both student and teacher mixer outputs, or neither")
    if student_mixer_out is not None and not (
            len(student_mixer_out) == len(teacher_mixer_out) == len(student_layer_out)):
        raise ValueError("need one mixer output per layer for student and teacher")

    layer = [_token_distance(s, t, squared, mask) for s, t in zip(student_layer_out, teacher_layer_out)]
    total = torch.stack(layer).sum()
    parts = {"layer": torch.stack(layer).detach()}
    if student_mixer_out is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and mixer_weight != 0):
            mixer = torch.stack([_token_distance(s, t, squared, mask)
                                 for s, t in zip(student_mixer_out, teacher_mixer_out)])
        if mixer_weight != 0:
            total = total + mixer_weight * mixer.sum()
        parts["mixer"] = mixer.detach()
    return total, parts


def topk_kd_loss(student_hidden: Tensor, student_head_weight: Tensor, teacher_topk_ids: Tensor,
                 teacher_topk_logprobs: Tensor, labels: Tensor | None = None, *, kl_weight: float = 1.0,
                 ce_weight: float = 0.0, temperature: float = 1.0, mask: Tensor | None = None,
                 chunk_size: int = 4096, ignore_index: int = -100) -> tuple[Tensor, dict[str, Tensor]]:
    """kl_weight * T^2 mean_t KL_t + ce_weight * CE, the teacher given only by its top-k targets (teacher_cache.py).

    KL_t = sum_{v in S_t} q_t(v) (log q_t(v) - log p_s(v)): S_t = teacher_topk_ids[..., t, :], the teacher's k
    most likely next tokens; teacher_topk_logprobs [..., k] its log softmax(z_t / T) there (the full softmax);
    q_t = those probabilities renormalised over S_t (softmax of the k log-probs: the teacher's mass outside S_t
    is dropped, and k = V gives kl_div exactly); log p_s = log softmax(z_s / T) over the whole vocabulary,
    z_s = h W^T, gathered at S_t. Forward direction only: the teacher's top-k support is all that is known.
    Logit-free as fused_linear_kd: one pass over blocks of <= chunk_size tokens, the gradient made in forward
    (d(T^2 KL_t)/dz_s = T (p_s - q_t scattered over V), since sum q_t = 1; of the CE p_s - onehot(label)),
    nothing T x V held. KL over tokens where mask != 0, CE over labels != ignore_index (kd_loss's conventions).
    Returns (total, parts) with parts {"kl", "ce"} detached; a term with weight 0 is not computed nor listed.
    """
    if kl_weight:
        _check_kl_args("forward", temperature)
        if (teacher_topk_ids.shape != teacher_topk_logprobs.shape
                or teacher_topk_ids.shape[:-1] != student_hidden.shape[:-1]):
            raise ValueError(f"top-k ids {tuple(teacher_topk_ids.shape)} and log-probs "
                             f"{tuple(teacher_topk_logprobs.shape)} must both be the student's token shape "
                             f"{tuple(student_hidden.shape[:-1])} + [k]")
    if ce_weight and labels is None:
        raise ValueError("ce_weight > 0 needs labels")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    n = hs.shape[0]
    dtype = _compute_dtype(student_hidden, student_head_weight, teacher_topk_logprobs)
    idx = log_q = None
    if kl_weight:
        idx = teacher_topk_ids.reshape(n, -1).long()
        lt = teacher_topk_logprobs.detach().reshape(n, -1).to(dtype)
        log_q = lt - torch.logsumexp(lt, dim=-1, keepdim=True)
    kl_rows, y = _token_rows(student_hidden, mask if kl_weight else None, labels if ce_weight else None)
    rows = max(1, min(chunk_size, FUSED_BLOCK_ELEMENTS // student_head_weight.shape[0]))
    opts = (float(kl_weight), float(ce_weight), float(temperature), rows, ignore_index, dtype)
    total, kl, ce = _TopKKD.apply(hs, student_head_weight, idx, log_q, kl_rows, y, opts)
    return total, {name: v for name, v, w in (("kl", kl, kl_weight), ("ce", ce, ce_weight)) if w}


class _TopKKD(torch.autograd.Function):
    """topk_kd_loss's loss and gradients in one forward; backward only scales the kept gradients."""

    @staticmethod
    def forward(ctx, hs, ws, idx, log_q, kl_rows, y, opts):
        kl_weight, ce_weight, temp, rows, ignore_index, dtype = opts
        n, dev = hs.shape[0], hs.device
        want_h, want_w = ctx.needs_input_grad[:2]
        dz_dtype = hs.dtype if _fast_half(hs, ws, dtype) else dtype
        dhs = torch.zeros(hs.shape, dtype=dtype, device=dev) if want_h else None
        dws = torch.zeros(ws.shape, dtype=dtype, device=dev) if want_w else None
        kl_sum = torch.zeros((), dtype=dtype, device=dev)
        ce_sum = torch.zeros((), dtype=dtype, device=dev)
        n_kl = (kl_rows.sum() if kl_rows is not None else torch.tensor(n, device=dev)).clamp_min(1).to(dtype)
        n_ce = (y != ignore_index).sum().clamp_min(1).to(dtype) if ce_weight else None
        for i0 in range(0, n, rows):
            i1 = min(i0 + rows, n)
            zs = _mm(hs[i0:i1], ws.T, dtype)
            dz = None
            if kl_weight:
                ls = torch.log_softmax(zs / temp if temp != 1 else zs, dim=-1)
                lq, ic = log_q[i0:i1], idx[i0:i1]
                q = lq.exp()
                tok = torch.where(q > 0, q * (lq - ls.gather(1, ic)), 0.0).sum(-1)
                valid = None if kl_rows is None else kl_rows[i0:i1].to(dtype)
                if valid is not None:
                    tok = tok * valid
                kl_sum += tok.sum()
                if want_h or want_w:
                    coef = kl_weight * temp / n_kl
                    dz = ls.exp_().scatter_add_(1, ic, -q).mul_(coef if valid is None else coef * valid[:, None])
                del ls, q
            if ce_weight:
                part, dce = _ce_block(zs, y[i0:i1], ignore_index, ce_weight / n_ce, dtype, want_h or want_w)
                ce_sum += part
                if dce is not None:
                    dz = dce if dz is None else dz.add_(dce)
                    del dce
            del zs
            if dz is None:
                continue
            _block_grads(dz.to(dz_dtype), hs, ws, i0, i1, dhs, dws, dtype)
        total, kl, ce = _totals(kl_sum, ce_sum, n_kl, n_ce, kl_weight, ce_weight, temp)
        ctx.save_for_backward(dhs, dws)
        ctx.dtypes = (hs.dtype, ws.dtype)
        ctx.mark_non_differentiable(kl, ce)
        return total, kl, ce

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _kl, _ce):
        dhs, dws = ctx.saved_tensors
        out = [None if d is None else (d * grad.to(d.dtype)).to(dt) for d, dt in zip((dhs, dws), ctx.dtypes)]
        return (*out, None, None, None, None, None)
