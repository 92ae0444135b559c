"""Distillation losses: zero at equality, hand-computed values, the chunked and logit-free KL equal the
plain KL (values and gradients, float64), the logit-free KL never builds a T x V tensor, ILD by hand."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hylo_lab.distill import losses
from hylo_lab.distill.losses import (
    chunked_kl_div,
    cross_entropy,
    fused_kl_available,
    fused_linear_cross_entropy,
    fused_linear_kd,
    hidden_state_kl_div,
    ild_loss,
    kd_loss,
    kl_div,
)

DIRECTIONS = ["forward", "reverse"]


def heads(B=2, T=7, Ds=5, Dt=6, V=11, dtype=torch.float64, seed=0):
    """Student and teacher hidden states and heads of different widths (a 1B student, an 8B teacher)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, T, Ds, generator=g, dtype=dtype).requires_grad_()
    ht = torch.randn(B, T, Dt, generator=g, dtype=dtype)
    ws = torch.randn(V, Ds, generator=g, dtype=dtype).requires_grad_()
    wt = torch.randn(V, Dt, generator=g, dtype=dtype)
    return hs, ht, ws, wt


def some_mask(B=2, T=7):
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, -3:] = False
    return mask


# --- zero at equality -------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_is_zero_with_zero_gradient_when_student_equals_teacher(direction, temperature):
    hs, _, ws, _ = heads(Dt=5)
    kw = dict(direction=direction, temperature=temperature)
    for loss in (kl_div(hs @ ws.T, (hs @ ws.T).detach(), **kw),
                 chunked_kl_div(hs, hs.detach(), ws, ws.detach(), chunk_size=3, **kw),
                 hidden_state_kl_div(hs, hs.detach(), ws, ws.detach(), token_chunk=3, vocab_chunk=4, **kw)):
        grads = torch.autograd.grad(loss, (hs, ws))
        assert abs(loss.item()) < 1e-12
        assert all(g.abs().max() < 1e-12 for g in grads)


def test_ild_is_zero_with_finite_zero_gradient_when_student_equals_teacher():
    h = [torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    for squared in (False, True):
        total, parts = ild_loss(h, [x.detach() for x in h], h, [x.detach() for x in h], squared=squared)
        (grad,) = torch.autograd.grad(total, h[0])
        assert total.item() == 0 and parts["layer"].abs().max() == 0 and parts["mixer"].abs().max() == 0
        assert torch.equal(grad, torch.zeros_like(grad))  # ||0||_2 has a zero subgradient, not NaN


# --- hand-computed values ---------------------------------------------------------------------------

# 2 tokens, 3 words. Token 0: teacher p = (1/2, 1/4, 1/4), student q = (1/3, 1/3, 1/3).
# Token 1: teacher = student, KL 0.
TEACHER = torch.log(torch.tensor([[2.0, 1.0, 1.0], [1.0, 2.0, 5.0]], dtype=torch.float64))
STUDENT = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 5.0]], dtype=torch.float64))
# forward KL(p || q) = 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8);  reverse KL(q || p) = 1/3 ln(2/3 * 4/3 * 4/3)
TOKEN0 = {"forward": 0.5 * math.log(9 / 8), "reverse": math.log(32 / 27) / 3}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_kl_by_hand_mean_over_tokens_and_mask(direction):
    assert kl_div(STUDENT, TEACHER, direction=direction).item() == pytest.approx(TOKEN0[direction] / 2, abs=1e-14)
    only_token0 = torch.tensor([True, False])
    assert kl_div(STUDENT, TEACHER, direction=direction, mask=only_token0).item() == pytest.approx(
        TOKEN0[direction], abs=1e-14)
    assert kl_div(STUDENT, TEACHER, direction=direction, mask=torch.tensor([0, 1])).item() == pytest.approx(
        0.0, abs=1e-14)
    assert kl_div(STUDENT, TEACHER, mask=torch.tensor([False, False])).item() == 0.0  # no valid token


def test_kl_by_hand_with_temperature_times_t_squared():
    # T = 2: teacher p = (sqrt2, 1, 1) / (2 + sqrt2), student uniform; KL(p || q) = sum p ln(3 p), times T^2 = 4
    r = math.sqrt(2)
    p = [r / (2 + r), 1 / (2 + r), 1 / (2 + r)]
    expected = 4 * sum(pi * math.log(3 * pi) for pi in p)
    got = kl_div(STUDENT[:1], TEACHER[:1], temperature=2.0)
    assert got.item() == pytest.approx(expected, abs=1e-14)


# --- chunked and logit-free KL == plain KL -----------------------------------------------------------


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
# T=7 tokens x 2, V=11: chunks of 3 and 5 tokens, vocab tiles of 4 and 3 divide neither; 1 is one row or
# one word at a time; 100 is larger than everything (one chunk, one tile)
@pytest.mark.parametrize("token_chunk, vocab_chunk", [(3, 4), (5, 3), (1, 1), (100, 100)])
def test_chunked_and_hidden_state_kl_equal_plain_kl(direction, temperature, masked, token_chunk, vocab_chunk):
    hs, ht, ws, wt = heads()
    mask = some_mask() if masked else None
    kw = dict(direction=direction, temperature=temperature, mask=mask)
    ref = kl_div(hs @ ws.T, ht @ wt.T, **kw)
    ref_grads = torch.autograd.grad(ref, (hs, ws))
    for loss in (chunked_kl_div(hs, ht, ws, wt, chunk_size=token_chunk, **kw),
                 hidden_state_kl_div(hs, ht, ws, wt, token_chunk=token_chunk, vocab_chunk=vocab_chunk, **kw)):
        grads = torch.autograd.grad(loss, (hs, ws))
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-10)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_kl_with_bias_and_softcapping_equals_plain(direction):
    hs, ht, ws, wt = heads()
    bs = torch.randn(11, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(11, dtype=torch.float64)
    cap = 3.0
    zs = cap * torch.tanh((hs @ ws.T + bs) / cap)
    zt = cap * torch.tanh((ht @ wt.T + bt) / cap)
    kw = dict(direction=direction, temperature=1.3, mask=some_mask())
    ref = kl_div(zs, zt, **kw)
    got = chunked_kl_div(hs, ht, ws, wt, chunk_size=4, student_head_bias=bs, teacher_head_bias=bt,
                         final_logit_softcapping=cap, **kw)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    for g, r in zip(torch.autograd.grad(got, (hs, ws, bs)), torch.autograd.grad(ref, (hs, ws, bs))):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_hidden_state_kl_gradcheck(direction):
    hs, ht, ws, wt = heads(B=1, T=5, Ds=3, Dt=4, V=7)
    mask = torch.tensor([[True, True, False, True, True]])

    def f(hs, ws):
        return hidden_state_kl_div(hs, ht, ws, wt, token_chunk=2, vocab_chunk=3, direction=direction,
                                   temperature=1.5, mask=mask, backend="torch")

    assert torch.autograd.gradcheck(f, (hs, ws))


def test_teacher_gets_no_gradient_in_any_variant():
    hs, ht, ws, wt = heads()
    ht.requires_grad_()
    wt.requires_grad_()
    for loss in (kl_div(hs @ ws.T, ht @ wt.T), chunked_kl_div(hs, ht, ws, wt, chunk_size=3),
                 hidden_state_kl_div(hs, ht, ws, wt, token_chunk=3, vocab_chunk=4)):
        assert torch.autograd.grad(loss, (ht, wt), allow_unused=True) == (None, None)


def test_bf16_inputs_give_the_float32_loss_of_the_same_numbers():
    hs, ht, ws, wt = (x.detach().to(torch.bfloat16) for x in heads(T=9, V=13))
    ref = kl_div(hs.float() @ ws.float().T, ht.float() @ wt.float().T, direction="reverse", mask=some_mask(T=9))
    for loss in (chunked_kl_div(hs, ht, ws, wt, chunk_size=4, direction="reverse", mask=some_mask(T=9)),
                 hidden_state_kl_div(hs, ht, ws, wt, token_chunk=4, vocab_chunk=5, direction="reverse",
                                     mask=some_mask(T=9))):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_hidden_state_kl_without_valid_tokens_is_zero_with_zero_gradient():
    hs, ht, ws, wt = heads()
    loss = hidden_state_kl_div(hs, ht, ws, wt, mask=torch.zeros(2, 7, dtype=torch.bool))
    grads = torch.autograd.grad(loss, (hs, ws))
    assert loss.item() == 0 and all(g.abs().max() == 0 for g in grads)


# --- memory: the logit-free KL never materialises T x V ----------------------------------------------


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.numel, self.ops = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_hidden_state_kl_never_allocates_a_tokens_by_vocab_tensor():
    # N = 64 tokens, V = 256 words, D = 8: N x V = 16384, one token chunk x V = 4096, the head 2048,
    # a tile 16 x 32 = 512. Nothing may exceed the head weight's own size.
    hs, ht, ws, wt = heads(B=2, T=32, Ds=8, Dt=8, V=256, dtype=torch.float32)
    with LargestTensor() as fwd:
        loss = hidden_state_kl_div(hs, ht, ws, wt, token_chunk=16, vocab_chunk=32, direction="reverse",
                                   backend="torch")
    with LargestTensor() as bwd:
        loss.backward()
    assert bwd.ops > 10  # the backward's ops were seen
    assert max(fwd.numel, bwd.numel) <= 256 * 8

    with LargestTensor() as plain:  # the detector does see full logits
        kl_div(hs @ ws.T, ht @ wt.T).backward()
    assert plain.numel >= 64 * 256


def test_chunked_kl_holds_one_chunk_of_logits():
    hs, ht, ws, wt = heads(B=2, T=32, Ds=8, Dt=8, V=256, dtype=torch.float32)
    with LargestTensor() as seen:
        chunked_kl_div(hs, ht, ws, wt, chunk_size=8).backward()
    assert seen.numel == 8 * 256


# --- fused linear KD (KL + CE in one pass, gradients made in forward) == plain --------------------------


def labels_for(B=2, T=7, V=11, seed=1):
    y = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    y[0, -1] = y[1, 3] = -100
    return y


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0), (0.7, 0.3)], ids=["kl", "ce", "kl+ce"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("block_rows", [3, 100], ids=["blocks_of_3", "one_block"])
def test_fused_linear_kd_equals_plain_values_and_gradients(monkeypatch, direction, weights, masked, block_rows):
    monkeypatch.setattr(losses, "FUSED_BLOCK_ELEMENTS", block_rows * 11)  # V = 11: blocks of 3 rows split 14
    hs, ht, ws, wt = heads()
    bs = torch.randn(11, dtype=torch.float64, requires_grad=True)
    y, mask = labels_for(), some_mask() if masked else None
    kl_w, ce_w = weights
    kw = dict(direction=direction, temperature=1.6, mask=mask)
    zs = hs @ ws.T + bs
    ref_kl = kl_div(zs, ht @ wt.T, **kw)
    ref_ce = cross_entropy(zs, y)
    ref = kl_w * ref_kl + ce_w * ref_ce
    total, parts = fused_linear_kd(hs, ws, ht, wt, y, kl_weight=kl_w, ce_weight=ce_w, chunk_size=5,
                                   student_head_bias=bs, **kw)
    assert total.dtype == torch.float64 and set(parts) == {n for n, w in (("kl", kl_w), ("ce", ce_w)) if w}
    torch.testing.assert_close(total, ref, rtol=0, atol=1e-12)
    if kl_w:
        torch.testing.assert_close(parts["kl"], ref_kl, rtol=0, atol=1e-12)
    if ce_w:
        torch.testing.assert_close(parts["ce"], ref_ce, rtol=0, atol=1e-12)
    for g, r in zip(torch.autograd.grad(3 * total, (hs, ws, bs)), torch.autograd.grad(3 * ref, (hs, ws, bs))):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_fused_cross_entropy_with_softcapping_equals_plain():
    hs, _, ws, _ = heads()
    y, cap = labels_for(), 2.0
    ref = cross_entropy(cap * torch.tanh((hs @ ws.T) / cap), y)
    got = fused_linear_cross_entropy(hs, ws, y, chunk_size=4, final_logit_softcapping=cap)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    for g, r in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(ref, (hs, ws))):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_fused_linear_kd_float32_close_to_float64_and_frozen_head():
    """float32 inputs: within 1e-5 of the float64 loss; a frozen head gets no gradient and none is made."""
    hs, ht, ws, wt = heads(T=33, V=50)
    y = torch.randint(0, 50, (2, 33), generator=torch.Generator().manual_seed(0))
    ref, _ = fused_linear_kd(hs, ws, ht, wt, y, ce_weight=0.5)
    f32 = [t.detach().float() for t in (hs, ht, ws, wt)]
    f32[0].requires_grad_()
    got, _ = fused_linear_kd(f32[0], f32[2], f32[1], f32[3], y, ce_weight=0.5)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-5, atol=0)
    got.backward()
    assert f32[0].grad is not None and f32[2].grad is None


def test_fused_linear_kd_holds_one_block_of_logits(monkeypatch):
    monkeypatch.setattr(losses, "FUSED_BLOCK_ELEMENTS", 8 * 256)
    hs, ht, ws, wt = heads(B=2, T=32, Ds=2, Dt=2, V=256, dtype=torch.float32)  # head 512 < block 2048 < T x V
    y = torch.randint(0, 256, (2, 32))
    with LargestTensor() as seen:
        total, _ = fused_linear_kd(hs, ws, ht, wt, y, ce_weight=1.0, chunk_size=4096)
        total.backward()
    assert seen.numel == 8 * 256


# --- cross-entropy and the KD combinator -------------------------------------------------------------


def test_cross_entropy_by_hand_with_ignore_index():
    # token 0: uniform over 3 words -> ln 3; token 1: p(label) = 5/8 -> ln(8/5); token 2 ignored
    logits = torch.log(torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 5.0], [9.0, 1.0, 1.0]], dtype=torch.float64))
    labels = torch.tensor([1, 2, -100])
    assert cross_entropy(logits, labels).item() == pytest.approx((math.log(3) + math.log(8 / 5)) / 2, abs=1e-14)
    assert cross_entropy(logits, torch.full((3,), -100)).item() == 0.0
    bf16 = cross_entropy(logits.to(torch.bfloat16)[None], labels[None])
    assert bf16.dtype == torch.float32


def test_kd_loss_is_the_weighted_sum():
    labels = torch.tensor([0, 2])
    total, parts = kd_loss(STUDENT, TEACHER, labels, kl_weight=0.7, ce_weight=0.3, temperature=2.0)
    kl = kl_div(STUDENT, TEACHER, temperature=2.0)
    ce = F.cross_entropy(STUDENT, labels)
    torch.testing.assert_close(total, 0.7 * kl + 0.3 * ce, rtol=0, atol=1e-14)
    assert set(parts) == {"kl", "ce"}
    total, parts = kd_loss(STUDENT, TEACHER)
    assert set(parts) == {"kl"} and total.item() == pytest.approx(TOKEN0["forward"] / 2, abs=1e-14)


# --- Enhanced ILD -------------------------------------------------------------------------------------


def ild_lists(L=3, B=2, T=5, D=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(B, T, D, generator=g, dtype=torch.float64) for _ in range(L)] for _ in range(4)]


def by_hand(student, teacher, mask, squared):
    """mean over valid tokens of the (squared) Euclidean norm, with explicit loops."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask is None or mask[b, t]:
                sq = sum((student[b, t, d].item() - teacher[b, t, d].item()) ** 2 for d in range(student.shape[2]))
                total += sq if squared else math.sqrt(sq)
                count += 1
    return total / count


@pytest.mark.parametrize("squared", [False, True], ids=["l2", "l2sq"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_ild_equals_per_layer_computation_by_hand(squared, masked):
    hs, ht, a_s, a_t = ild_lists()
    mask = some_mask(T=5) if masked else None
    total, parts = ild_loss(hs, ht, a_s, a_t, mixer_weight=0.5, squared=squared, mask=mask)
    layer = [by_hand(s, t, mask, squared) for s, t in zip(hs, ht)]
    mixer = [by_hand(s, t, mask, squared) for s, t in zip(a_s, a_t)]
    assert parts["layer"].tolist() == pytest.approx(layer, abs=1e-12)
    assert parts["mixer"].tolist() == pytest.approx(mixer, abs=1e-12)
    assert total.item() == pytest.approx(sum(layer) + 0.5 * sum(mixer), abs=1e-12)


def test_ild_squared_vs_plain_on_a_3_4_5_triangle():
    student = [torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])]  # token 0 at distance 5, token 1 at 0
    teacher = [torch.zeros(1, 2, 2)]
    assert ild_loss(student, teacher)[0].item() == pytest.approx(2.5)
    assert ild_loss(student, teacher, squared=True)[0].item() == pytest.approx(12.5)


def test_ild_without_mixer_term_is_plain_ild():
    hs, ht, a_s, a_t = ild_lists()
    hs = [x.requires_grad_() for x in hs]
    a_s = [x.requires_grad_() for x in a_s]
    plain, plain_parts = ild_loss(hs, ht)
    off, off_parts = ild_loss(hs, ht, a_s, a_t, mixer_weight=0.0)
    assert set(plain_parts) == {"layer"} and set(off_parts) == {"layer", "mixer"}  # still measured
    assert off.item() == plain.item()
    assert torch.autograd.grad(off, a_s[0], allow_unused=True) == (None,)
    assert plain.item() == pytest.approx(sum(plain_parts["layer"].tolist()), abs=1e-12)


def test_ild_rejects_mismatched_lists():
    hs, ht, a_s, _ = ild_lists()
    with pytest.raises(ValueError):
        ild_loss(hs, ht[:2])
    with pytest.raises(ValueError):
        ild_loss(hs, ht, a_s, None)


# --- the fla backend -----------------------------------------------------------------------------------


def test_fla_backend_on_cpu_falls_back_or_refuses():
    hs, ht, ws, wt = heads(dtype=torch.float32)
    assert not fused_kl_available("cpu")
    torch.testing.assert_close(hidden_state_kl_div(hs, ht, ws, wt, backend="auto"),
                               hidden_state_kl_div(hs, ht, ws, wt, backend="torch"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="fla"):
        hidden_state_kl_div(hs, ht, ws, wt, backend="fla")


@pytest.mark.gpu
@pytest.mark.skipif(not fused_kl_available("cuda"), reason="needs CUDA and flash-linear-attention")
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_fla_fused_kl_equals_torch_reference(temperature):
    hs, ht, ws, wt = (x.detach().float().cuda().requires_grad_(x.requires_grad)
                      for x in heads(B=2, T=300, Ds=64, Dt=96, V=1000))
    mask = torch.rand(2, 300, device="cuda") > 0.2
    kw = dict(temperature=temperature, mask=mask, token_chunk=128, vocab_chunk=256)
    ref = hidden_state_kl_div(hs, ht, ws, wt, backend="torch", **kw)
    got = hidden_state_kl_div(hs, ht, ws, wt, backend="fla", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(ref, (hs, ws))):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_hidden_state_kl_bf16_on_cuda_matches_float32_math(direction):
    # bf16 products accumulate in float32: the value is float32's; grads carry dz rounded to bf16
    hs, ht, ws, wt = (x.detach().to("cuda", torch.bfloat16).requires_grad_(x.requires_grad)
                      for x in heads(B=2, T=300, Ds=64, Dt=96, V=1000))
    f32 = [x.detach().float().requires_grad_(x.requires_grad) for x in (hs, ht, ws, wt)]
    kw = dict(direction=direction, temperature=1.5, token_chunk=128, vocab_chunk=256, backend="torch")
    got = hidden_state_kl_div(hs, ht, ws, wt, **kw)
    ref = hidden_state_kl_div(*f32, **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(ref, (f32[0], f32[2]))):
        assert g.dtype == torch.bfloat16
        assert ((g.float() - r).norm() / r.norm()).item() < 1e-2


def test_fused_linear_cross_entropy_backends_on_cpu():
    """auto is ours where Liger cannot run; forcing liger there says why in one line; unknown names fail."""
    hs, _, ws, _ = heads()
    labels = torch.tensor([[1, 2, 3, -100, 4, 5, 6], [0, -100, 1, 2, 3, 4, 5]])
    ref = cross_entropy(hs @ ws.T, labels)
    torch.testing.assert_close(fused_linear_cross_entropy(hs, ws, labels, chunk_size=3), ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused_linear_cross_entropy(hs, ws, labels, backend="torch"), ref, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="backend='liger' cannot run here: Liger-Kernel needs CUDA"):
        fused_linear_cross_entropy(hs, ws, labels, backend="liger")
    with pytest.raises(ValueError, match="auto, torch, liger"):
        fused_linear_cross_entropy(hs, ws, labels, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or losses._liger_flce() is None, reason="needs CUDA and liger-kernel")
def test_liger_cross_entropy_equals_ours_on_cuda():
    hs, _, ws, _ = (x.detach().to("cuda", torch.float32).requires_grad_(x.requires_grad)
                    for x in heads(B=2, T=300, Ds=64, Dt=96, V=1000))
    labels = torch.randint(0, 1000, (2, 300), device="cuda")
    labels[0, :10] = -100
    got = fused_linear_cross_entropy(hs, ws, labels, backend="liger")
    ref = fused_linear_cross_entropy(hs, ws, labels, backend="torch", chunk_size=128)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(torch.autograd.grad(got, (hs, ws)), torch.autograd.grad(ref, (hs, ws))):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
    all_ignored = torch.full_like(labels, -100)
    assert fused_linear_cross_entropy(hs, ws, all_ignored, backend="liger").item() == 0.0
