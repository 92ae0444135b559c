"""Ops: chunked == recurrent, both == an independent reference, states carry across pieces, dispatch rules.

Shapes are tiny; float64 wherever a tolerance matters. With chunk_size=64: T=1 is one decode step, 63 is one
short of a chunk, 64 exactly one, 130 crosses two chunk borders and ends mid-chunk.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from hylo_lab.ops import (KernelUnavailableError, causal_conv1d, chunked_gated_delta_rule, chunked_ssd,
                          gated_delta_rule, recurrent_gated_delta_rule, recurrent_ssd, ssd)
from hylo_lab.ops import dispatch

F64 = torch.float64
LENGTHS = [1, 63, 64, 130]


def gdn_inputs(B=2, T=130, H=3, K=8, V=16, dtype=F64, seed=0, normalise_k=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g, dtype=F64)
    k = torch.randn(B, T, H, K, generator=g, dtype=F64)
    if normalise_k:
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, V, generator=g, dtype=F64)
    decay = -torch.rand(B, T, H, generator=g, dtype=F64) * 0.5  # log decay <= 0
    beta = torch.rand(B, T, H, generator=g, dtype=F64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=F64)
    return [t.to(dtype) for t in (q, k, v, decay, beta)], s0


def ssd_inputs(B=2, T=130, H=3, P=16, N=8, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g, dtype=F64)
    dt = F.softplus(torch.randn(B, T, H, generator=g, dtype=F64) - 2)
    A = -torch.rand(H, generator=g, dtype=F64) * 4 - 0.5
    Bm = torch.randn(B, T, H, N, generator=g, dtype=F64)
    C = torch.randn(B, T, H, N, generator=g, dtype=F64)
    s0 = torch.randn(B, H, N, P, generator=g, dtype=F64)
    return [t.to(dtype) for t in (x, dt, A, Bm, C)], s0


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


# ---------------------------------------------------------------- gated delta rule

@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_gated_delta_chunked_matches_recurrent(T, with_state):
    (q, k, v, g, beta), s0 = gdn_inputs(T=T)
    s0 = s0 if with_state else None
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    o_c, s_c = chunked_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True, chunk_size=64)
    close(o_c, o_r, 1e-10)
    close(s_c, s_r, 1e-10)
    assert s_c.dtype == F64 and o_c.shape == (2, T, 3, 16) and s_c.shape == (2, 3, 8, 16)


# transformers computes in float32 internally: agreement to ~1e-6 is the best it can show.
@pytest.mark.parametrize("l2norm", [True, False], ids=["qk_l2norm", "prenormalised_k"])
def test_gated_delta_matches_transformers_reference(l2norm):
    from transformers.models.qwen3_next.modeling_qwen3_next import (torch_chunk_gated_delta_rule,
                                                                    torch_recurrent_gated_delta_rule)

    (q, k, v, g, beta), s0 = gdn_inputs(T=130, normalise_k=not l2norm)
    o, s = chunked_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=l2norm, chunk_size=64)
    # Same layout as ours: time-first [B, T, H, D], state [B, H, K, V], scale K**-0.5.
    o_tc, s_tc = torch_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=64, initial_state=s0,
                                              output_final_state=True, use_qk_l2norm_in_kernel=l2norm)
    o_tr, s_tr = torch_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                                                  use_qk_l2norm_in_kernel=l2norm)
    for ref_o, ref_s in ((o_tc, s_tc), (o_tr, s_tr)):
        close(o, ref_o, 2e-5)
        close(s, ref_s, 2e-5)


def test_gated_delta_state_carries_across_pieces():
    (q, k, v, g, beta), s0 = gdn_inputs(T=130)
    o_full, s_full = chunked_gated_delta_rule(q, k, v, g, beta, initial_state=s0, use_qk_l2norm=True)
    state, outs = s0, []
    for a, b in ((0, 50), (50, 51), (51, 130)):
        fn = recurrent_gated_delta_rule if b - a == 1 else chunked_gated_delta_rule
        o, state = fn(*(t[:, a:b] for t in (q, k, v, g, beta)), initial_state=state, use_qk_l2norm=True)
        outs.append(o)
    close(torch.cat(outs, 1), o_full, 1e-10)
    close(state, s_full, 1e-10)


def test_gated_delta_gradients_match_recurrent():
    (q, k, v, g, beta), s0 = gdn_inputs(B=1, T=21, H=2, K=4, V=4)
    grads = []
    for fn, kw in ((recurrent_gated_delta_rule, {}), (chunked_gated_delta_rule, {"chunk_size": 8})):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, g, beta, s0)]
        o, s = fn(*leaves[:5], initial_state=leaves[5], use_qk_l2norm=True, **kw)
        (o.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        close(a, b, 1e-9)


def test_gated_delta_bf16_close_to_float64():
    (q, k, v, g, beta), _ = gdn_inputs(T=70)
    ref, _ = chunked_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm=True)
    o, s = chunked_gated_delta_rule(*(t.bfloat16() for t in (q, k, v, g, beta)), use_qk_l2norm=True)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    close(o, ref, 0.05 * ref.abs().max().item())


def test_gated_delta_rule_dispatch_picks_recurrent_for_one_token():
    (q, k, v, g, beta), s0 = gdn_inputs(T=1)
    o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, backend="torch")
    o_r, s_r = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0)
    close(o, o_r, 0)
    close(s, s_r, 0)
    _, none = gated_delta_rule(q, k, v, g, beta, output_final_state=False, backend="torch")
    assert none is None


# ---------------------------------------------------------------- SSD

def naive_ssd(x, dt, A, B, C, s0):
    """y_t = C_t^T (exp(sum_{r<=t} dt_r A) s0) + sum_{s<=t} (C_t . B_s) exp(sum_{r=s+1..t} dt_r A) dt_s x_s."""
    cum = torch.cumsum(dt * A, dim=1)  # [B, T, H]
    T = x.shape[1]
    decay = (cum[:, :, None] - cum[:, None, :]).exp()  # [B, t, s, H]: exp(sum_{r=s+1..t} dt_r A)
    decay = decay * torch.ones(T, T, dtype=x.dtype).tril()[None, :, :, None]
    scores = torch.einsum("bthn,bshn->btsh", C, B) * decay
    y = torch.einsum("btsh,bsh,bshp->bthp", scores, dt, x)
    y = y + torch.einsum("bthn,bth,bhnp->bthp", C, cum.exp(), s0)
    final = torch.einsum("bsh,bshn,bsh,bshp->bhnp", (cum[:, -1:] - cum).exp(), B, dt, x)
    final = final + cum[:, -1, :, None, None].exp() * s0
    return y, final


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
@pytest.mark.parametrize("T", LENGTHS, ids=lambda t: f"T{t}")
def test_ssd_chunked_matches_recurrent_and_naive(T, with_state):
    (x, dt, A, B, C), s0 = ssd_inputs(T=T)
    s0 = s0 if with_state else torch.zeros_like(s0)
    y_r, s_r = recurrent_ssd(x, dt, A, B, C, initial_state=s0 if with_state else None)
    y_c, s_c = chunked_ssd(x, dt, A, B, C, initial_state=s0 if with_state else None, chunk_size=64)
    y_n, s_n = naive_ssd(x, dt, A, B, C, s0)
    for y, s in ((y_r, s_r), (y_c, s_c)):
        close(y, y_n, 1e-9)
        close(s, s_n, 1e-9)
    assert y_c.shape == (2, T, 3, 16) and s_c.shape == (2, 3, 8, 16)


def test_ssd_state_carries_across_pieces():
    (x, dt, A, B, C), s0 = ssd_inputs(T=130)
    y_full, s_full = chunked_ssd(x, dt, A, B, C, initial_state=s0, chunk_size=32)
    state, outs = s0, []
    for a, b in ((0, 7), (7, 8), (8, 130)):
        y, state = ssd(*(t[:, a:b] for t in (x, dt)), A, *(t[:, a:b] for t in (B, C)), initial_state=state,
                       chunk_size=32, backend="torch")
        outs.append(y)
    close(torch.cat(outs, 1), y_full, 1e-10)
    close(state, s_full, 1e-10)


def test_ssd_gradients_match_recurrent():
    (x, dt, A, B, C), s0 = ssd_inputs(B=1, T=19, H=2, P=4, N=4)
    grads = []
    for fn, kw in ((recurrent_ssd, {}), (chunked_ssd, {"chunk_size": 8})):
        leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, s0)]
        y, s = fn(*leaves[:5], initial_state=leaves[5], **kw)
        (y.square().sum() + s.sum()).backward()
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        close(a, b, 1e-9)


def test_ssd_bf16_close_to_float64():
    (x, dt, A, B, C), _ = ssd_inputs(T=70)
    ref, _ = chunked_ssd(x, dt, A, B, C)
    y, s = chunked_ssd(x.bfloat16(), dt.float(), A.float(), B.bfloat16(), C.bfloat16())
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    close(y, ref, 0.03 * ref.abs().max().item())


# 1001 tokens in chunks of 16: 63 chunks, the last one short. Strong decay (total log decay ~ -1e3) is where a
# segment sum taken as a difference of prefix sums loses float32 precision; float32 within 2e-4 of float64.
@pytest.mark.parametrize("op", ["ssd", "gated_delta"])
def test_chunked_float32_long_sequence_matches_float64_recurrent_with_gradients(op):
    if op == "ssd":
        (x, dt, A, B, C), s0 = ssd_inputs(B=1, T=1001, H=2, P=8, N=4)
        inputs, chunked, recurrent = (x, dt * 3, A, B, C), chunked_ssd, recurrent_ssd
    else:
        (q, k, v, g, beta), s0 = gdn_inputs(B=1, T=1001, H=2, K=4, V=8)
        inputs, chunked, recurrent = (q, F.normalize(k, dim=-1), v, g * 4, beta), chunked_gated_delta_rule, \
            recurrent_gated_delta_rule
    ref_leaves = [t.clone().requires_grad_() for t in (*inputs, s0)]
    y_ref, s_ref = recurrent(*ref_leaves[:5], initial_state=ref_leaves[5])
    (y_ref.square().sum() + s_ref.sum()).backward()
    leaves = [t.float().requires_grad_() for t in (*inputs, s0)]
    y, s = chunked(*leaves[:5], initial_state=leaves[5], chunk_size=16)
    (y.square().sum() + s.sum()).backward()
    close(y, y_ref, 2e-4 * y_ref.abs().max().item())
    close(s, s_ref, 2e-4 * s_ref.abs().max().item())
    for a, b in zip(leaves, ref_leaves):
        close(a.grad, b.grad, 2e-4 * b.grad.abs().max().item())


# ---------------------------------------------------------------- causal conv

@pytest.mark.parametrize("W", [1, 4], ids=lambda w: f"W{w}")
def test_causal_conv1d_matches_nn_conv1d(W):
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, W, groups=6, padding=W - 1, bias=True).double()
    x = torch.randn(2, 11, 6, dtype=F64)
    ref = F.silu(conv(x.transpose(1, 2))[..., :11].transpose(1, 2))
    y, tail = causal_conv1d(x, conv.weight, conv.bias, activation="silu")
    close(y, ref, 1e-12)
    assert tail.shape == (2, 6, W - 1)
    close(tail, x[:, 11 - (W - 1):].transpose(1, 2), 0)


# pieces shorter than the W-1 tail (1 and 2 tokens) must still carry the right inputs forward
@pytest.mark.parametrize("splits", [(1, 2, 1, 9), (5, 8), (1,) * 13], ids=["short_pieces", "two_pieces", "steps"])
def test_causal_conv1d_pieces_equal_one_pass(splits):
    torch.manual_seed(0)
    x = torch.randn(2, 13, 5, dtype=F64)
    w, b = torch.randn(5, 4, dtype=F64), torch.randn(5, dtype=F64)
    y_full, tail_full = causal_conv1d(x, w, b, activation="silu")
    state, ys, start = None, [], 0
    for n in splits:
        y, state = causal_conv1d(x[:, start:start + n], w, b, state=state, activation="silu")
        ys.append(y)
        start += n
    close(torch.cat(ys, 1), y_full, 1e-12)
    close(state, tail_full, 0)


# ---------------------------------------------------------------- dispatch

def _forbid_kernel_checks(monkeypatch):
    def boom(pkg):
        raise AssertionError(f"kernel package {pkg!r} was checked")
    monkeypatch.setattr(dispatch, "kernel_available", boom)


def test_torch_backend_never_tries_kernels(monkeypatch):
    _forbid_kernel_checks(monkeypatch)
    (q, k, v, g, beta), _ = gdn_inputs(T=5)
    (x, dt, A, B, C), _ = ssd_inputs(T=5)
    for backend in ("torch", "auto"):  # "auto" on CPU tensors must not even try an import
        gated_delta_rule(q, k, v, g, beta, backend=backend)
        ssd(x, dt, A, B, C, backend=backend)
    assert not dispatch.use_kernel("fla", "torch", q)
    assert not dispatch.use_kernel("fla", "mamba_ssm", q)  # forcing one package says nothing about the other


@pytest.mark.parametrize("backend", ["fla", "mamba_ssm"])
def test_forced_kernel_on_cpu_raises_clearly(backend):
    (x, dt, A, B, C), _ = ssd_inputs(T=5)
    with pytest.raises(KernelUnavailableError, match=f"kernel_backend='{backend}'.*CUDA"):
        ssd(x, dt, A, B, C, backend=backend)
    if backend == "fla":
        (q, k, v, g, beta), _ = gdn_inputs(T=5)
        with pytest.raises(KernelUnavailableError, match="CUDA"):
            gated_delta_rule(q, k, v, g, beta, backend="fla")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.use_kernel("fla", "triton", torch.zeros(1))


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Decisions and announcements are cached per process: start each test with empty caches."""
    cached = (dispatch.fla_backward_refused, dispatch.backward_decision)
    for fn in cached:
        fn.cache_clear()
    monkeypatch.setattr(dispatch, "_announced", set())
    yield
    for fn in cached:
        fn.cache_clear()


def _hopper_with_triton_3_6(monkeypatch, importable=()):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(dispatch, "_triton_version", lambda: (3, 6, 0))
    monkeypatch.setattr(dispatch, "module_imports", lambda module: module in importable)


def test_tilelang_fixes_the_gated_delta_backward_not_simple_gla(monkeypatch, fresh_dispatch):
    _hopper_with_triton_3_6(monkeypatch, importable=("tilelang",))
    assert dispatch.fla_backward_refused("gated_delta") is None
    assert "simple_gla" in dispatch.fla_backward_refused("simple_gla")
    dispatch.fla_backward_refused.cache_clear()
    _hopper_with_triton_3_6(monkeypatch, importable=())
    assert "tilelang" in dispatch.fla_backward_refused("gated_delta")
    monkeypatch.setattr(dispatch, "_triton_version", lambda: (3, 7, 1))
    dispatch.fla_backward_refused.cache_clear()
    assert dispatch.fla_backward_refused("simple_gla") is None


def test_refused_backward_falls_back_once_and_says_how_to_get_the_kernel(monkeypatch, fresh_dispatch, caplog):
    """Under "auto", a chunked call that needs a backward fla cannot run here takes the PyTorch path; the
    probe runs once per op and device, one warning names the path and the fix; no-grad and forced "fla"
    calls keep the kernel."""
    monkeypatch.setattr(dispatch, "use_kernel", lambda name, backend, *t: True)
    monkeypatch.setattr(dispatch, "fla_backward_refused", lambda op: None)
    probes = []
    monkeypatch.setattr(dispatch, "_probe_backward",
                        lambda op, device: probes.append(op) or (None if op == "gated_delta" else "RuntimeError: no"))
    x = torch.randn(2, requires_grad=True)
    with caplog.at_level("INFO", logger="hylo_lab.ops"):
        for _ in range(3):
            assert not dispatch.use_fla_chunk("simple_gla", "auto", x)
            assert dispatch.use_fla_chunk("gated_delta", "auto", x)
    assert probes == ["simple_gla", "gated_delta"]
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "PyTorch" in warnings[0].message and "mamba-ssm" in warnings[0].message
    assert dispatch.use_fla_chunk("simple_gla", "fla", x)
    with torch.no_grad():
        assert dispatch.use_fla_chunk("simple_gla", "auto", x)
    assert dispatch.use_fla_chunk("simple_gla", "auto", x.detach())


@pytest.mark.parametrize("op", ["ssd", "gated_delta"])
def test_auto_never_reaches_a_refused_kernel(monkeypatch, fresh_dispatch, op):
    """With fla 'importable' but its backward refused, the public ops train through the PyTorch path."""
    import sys

    gd_mod, ssd_mod = sys.modules["hylo_lab.ops.gated_delta"], sys.modules["hylo_lab.ops.ssd"]  # names shadowed

    fake = lambda name, backend, *t: name == "fla"  # noqa: E731
    for mod in (dispatch, gd_mod, ssd_mod):
        monkeypatch.setattr(mod, "use_kernel", fake)
    monkeypatch.setattr(dispatch, "backward_decision", lambda op, device: "refused")
    if op == "ssd":
        inputs, _ = ssd_inputs(T=20)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, _ = ssd(*leaves, backend="auto")
        ref, _ = chunked_ssd(*inputs)
    else:
        inputs, _ = gdn_inputs(T=20)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, _ = gated_delta_rule(*leaves, backend="auto")
        ref, _ = chunked_gated_delta_rule(*inputs)
    close(out, ref, 1e-12)
    out.sum().backward()


def test_gla_backward_is_outside_the_known_refusal(monkeypatch, fresh_dispatch):
    _hopper_with_triton_3_6(monkeypatch, importable=())
    assert "simple_gla" in dispatch.fla_backward_refused("simple_gla")
    assert dispatch.fla_backward_refused("gla") is None


def test_ssd_trains_through_fla_gla_where_simple_gla_is_refused(monkeypatch, fresh_dispatch, caplog):
    """Mamba2's SSD prefers fla's simple_gla; where its backward is refused, GLA (the same recurrence with the
    gate on every key dim) runs, said once; with neither, the PyTorch path and one warning."""
    import sys

    ssd_mod = sys.modules["hylo_lab.ops.ssd"]
    fake = lambda name, backend, *t: name == "fla"  # noqa: E731
    for mod in (dispatch, ssd_mod):
        monkeypatch.setattr(mod, "use_kernel", fake)
    monkeypatch.setattr(dispatch, "fla_backward_refused", lambda op: None)
    refused = {"simple_gla"}
    monkeypatch.setattr(dispatch, "_probe_backward", lambda op, device: "RuntimeError: no" if op in refused else None)
    calls = []
    monkeypatch.setattr(ssd_mod, "_fla_ssd", lambda *a, **kw: calls.append(kw["gated_keys"]) or (a[0], None))
    inputs, _ = ssd_inputs(T=20)
    leaves = [t.clone().requires_grad_() for t in inputs]
    with caplog.at_level("INFO", logger="hylo_lab.ops"):
        for _ in range(2):
            ssd(*leaves, backend="auto")
        with torch.no_grad():
            ssd(*leaves, backend="auto")
    assert calls == [True, True, False]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "fla gla kernel" in lines[0] and "simple_gla refused: RuntimeError: no" in lines[0]

    refused.add("gla")
    dispatch.backward_decision.cache_clear()
    caplog.clear()
    with caplog.at_level("INFO", logger="hylo_lab.ops"):
        out, _ = ssd(*leaves, backend="auto")
    close(out, chunked_ssd(*inputs)[0], 1e-12)
    assert len(calls) == 3
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "gla: RuntimeError: no" in caplog.records[0].message
