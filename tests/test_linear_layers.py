"""GatedDeltaNet and Mamba2 layers: pieces == one pass, decode == one pass, left padding, gradients, bf16,
parameter names, and each layer against an independent full-layer reference.

Tiny shapes: hidden 32, 4 query heads / 2 KV heads of dim 8 (Mamba2: d_inner 32, d_xb 16), GDN 2 heads of
key dim 8 and value dim 16; chunk_size 16 so T=37 crosses two chunk borders and ends mid-chunk.
Layers run in float64, but the shared norms (layers/common.py) compute in float32: equalities hold to ~1e-7.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy

import pytest
import torch
import torch.nn.functional as F

from hylo_lab.cache import LinearState
from hylo_lab.config import HyloConfig
from hylo_lab.layers.gdn import GatedDeltaNet
from hylo_lab.layers.mamba2 import Mamba2

F64 = torch.float64
EXACT = 1e-6  # float64 everywhere except the float32 norms
KINDS = ["gdn", "mamba2"]


def make_config(kind, **overrides):
    kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              gdn_num_heads=2, gdn_head_dim=8, gdn_expand_v=2.0, chunk_size=16, kernel_backend="torch",
              mixers=[kind])
    kw.update(overrides)
    return HyloConfig(**kw)


def make_layer(kind, dtype=F64, seed=0, **overrides):
    torch.manual_seed(seed)
    cls = GatedDeltaNet if kind == "gdn" else Mamba2
    layer = cls(make_config(kind, **overrides), layer_idx=0)
    with torch.no_grad():  # move every parameter off its init so that no term is trivially 1 or 0
        for name, p in layer.named_parameters():
            if name.endswith("norm.weight") or name == "D":
                p.add_(0.3 * torch.randn_like(p))
    return layer.to(dtype)


def inputs(B=2, T=37, D=32, dtype=F64, seed=1):
    return torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def close(a, b, tol):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, f"max abs error {err:.3g} > {tol}"


def run_in_pieces(layer, x, sizes, mask=None):
    state, outs, start = LinearState(), [], 0
    for n in sizes:
        m = None if mask is None else mask[:, :start + n]  # generate-style mask: past + new tokens
        outs.append(layer(x[:, start:start + n], state=state, attention_mask=m))
        start += n
    assert start == x.shape[1]
    return torch.cat(outs, 1), state


def assert_states_close(a: LinearState, b: LinearState, tol):
    assert a.conv.keys() == b.conv.keys()
    for name in a.conv:
        close(a.conv[name], b.conv[name], tol)
    close(a.recurrent, b.recurrent, tol)


# ---------------------------------------------------------------- state handling

# 15 + 1 + 21: a prefill, a single token and a piece crossing a chunk border; 2 + 1 + 34: pieces shorter
# than the conv tail (W-1 = 3)
@pytest.mark.parametrize("sizes", [(15, 1, 21), (2, 1, 34)], ids=["15+1+21", "2+1+34"])
@pytest.mark.parametrize("kind", KINDS)
def test_pieces_equal_one_pass(kind, sizes):
    layer, x = make_layer(kind), inputs()
    full, full_state = run_in_pieces(layer, x, [37])
    pieces, state = run_in_pieces(layer, x, sizes)
    close(pieces, full, EXACT)
    assert_states_close(state, full_state, 1e-10)  # states skip the norms
    close(full, layer(x), EXACT)  # no state: same output


@pytest.mark.parametrize("kind", KINDS)
def test_decode_steps_equal_one_pass(kind):
    layer, x = make_layer(kind), inputs(T=12)
    full, full_state = run_in_pieces(layer, x, [12])
    steps, state = run_in_pieces(layer, x, [5] + [1] * 7)  # a prefill then 7 one-token decode steps
    close(steps, full, EXACT)
    assert_states_close(state, full_state, 1e-10)  # states skip the norms


@pytest.mark.parametrize("kind", KINDS)
def test_state_layout_and_dtypes(kind):
    layer, x = make_layer(kind, dtype=torch.bfloat16), inputs(T=5, dtype=torch.bfloat16)
    state = LinearState()
    layer(x, state=state)
    assert state.recurrent.dtype == torch.float32
    assert all(t.dtype == torch.bfloat16 for t in state.conv.values())
    if kind == "gdn":
        assert state.recurrent.shape == (2, 2, 8, 16)  # [B, H, K, V]
        assert {k: tuple(v.shape) for k, v in state.conv.items()} == {
            "q_conv1d": (2, 16, 3), "k_conv1d": (2, 16, 3), "v_conv1d": (2, 32, 3)}
    else:
        assert state.recurrent.shape == (2, 4, 8, 8)  # [B, H, N, P]
        assert {k: tuple(v.shape) for k, v in state.conv.items()} == {"conv1d": (2, 2 * 16 + 32, 3)}


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_equals_unpadded_sequences(kind):
    layer = make_layer(kind)
    lengths, T = (37, 26), 37
    x = inputs(B=2, T=T)  # the padded slots of row 1 hold garbage on purpose
    mask = torch.zeros(2, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    # padded prefill in two pieces, then one decode step for both rows
    out, state = run_in_pieces(layer, x, [20, 17], mask=mask)
    step = inputs(B=2, T=1, seed=5)
    mask_step = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    out_step = layer(step, state=state, attention_mask=mask_step)
    for b, n in enumerate(lengths):
        ref_state = LinearState()
        ref = layer(x[b:b + 1, T - n:], state=ref_state)
        ref_step = layer(step[b:b + 1], state=ref_state)
        close(out[b:b + 1, T - n:], ref, EXACT)
        close(out_step[b:b + 1], ref_step, EXACT)
        close(state.recurrent[b:b + 1], ref_state.recurrent, 1e-10)
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- training and precision

@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    layer, x = make_layer(kind, dtype=torch.float32), inputs(T=37, dtype=torch.float32)
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"{name} has a zero or non-finite gradient"


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_close_to_fp32(kind):
    layer = make_layer(kind, dtype=torch.float32)
    x = inputs(T=37, dtype=torch.float32)
    ref = layer(x)
    out = copy.deepcopy(layer).to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    close(out, ref, 0.05 * ref.abs().max().item())


# ---------------------------------------------------------------- names, dims, init

def test_gdn_parameter_names_match_fla():
    shapes = {n: tuple(p.shape) for n, p in make_layer("gdn").named_parameters()}
    assert shapes == {
        "q_proj.weight": (16, 32), "k_proj.weight": (16, 32), "v_proj.weight": (32, 32),
        "a_proj.weight": (2, 32), "b_proj.weight": (2, 32), "A_log": (2,), "dt_bias": (2,),
        "q_conv1d.weight": (16, 1, 4), "k_conv1d.weight": (16, 1, 4), "v_conv1d.weight": (32, 1, 4),
        "g_proj.weight": (32, 32), "o_norm.weight": (16,), "o_proj.weight": (32, 32)}


def test_mamba2_parameter_names_and_init():
    layer = Mamba2(make_config("mamba2"), 0)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    # in_proj rows: z 32 | x 16 | B 16 | C 32 | dt 4
    assert shapes == {"in_proj.weight": (100, 32), "conv1d.weight": (64, 1, 4), "conv1d.bias": (64,),
                      "dt_bias": (4,), "A_log": (4,), "D": (4,), "norm.weight": (32,), "out_proj.weight": (32, 32)}
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert ((layer.A_log.exp() >= 1) & (layer.A_log.exp() <= 16)).all()
    assert (layer.D == 1).all()


def test_mamba2_rejects_state_size_other_than_head_dim():
    with pytest.raises(ValueError, match="mamba2_state_size == head_dim"):
        Mamba2(make_config("mamba2", mamba2_state_size=16), 0)


# ---------------------------------------------------------------- independent full-layer references

def test_gdn_matches_reference_forward():
    """nn.Conv1d's own forward + transformers' recurrent gated delta rule + plain gated RMSNorm."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_recurrent_gated_delta_rule

    layer, x = make_layer("gdn"), inputs(T=20)
    B, T, _ = x.shape

    def conv(name, t):
        return F.silu(getattr(layer, name)(t.transpose(1, 2))[..., :T].transpose(1, 2))

    q = conv("q_conv1d", layer.q_proj(x)).view(B, T, 2, 8)
    k = conv("k_conv1d", layer.k_proj(x)).view(B, T, 2, 8)
    v = conv("v_conv1d", layer.v_proj(x)).view(B, T, 2, 16)
    g = -layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias)
    beta = torch.sigmoid(layer.b_proj(x))
    o, _ = torch_recurrent_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o = o.double()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-5) * layer.o_norm.weight
    o = o * F.silu(layer.g_proj(x).view(B, T, 2, 16))
    ref = layer.o_proj(o.reshape(B, T, 32))
    close(layer(x), ref, 1e-5)  # transformers' rule runs in float32


def test_mamba2_matches_transformers_mamba2_mixer():
    """With H_kv = H (no repeat) our layout is transformers' Mamba2Mixer with n_groups = H: same names,
    same in_proj rows [z | x B C | dt], per-head gated norm. Load our weights and compare."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    layer = make_layer("mamba2", num_key_value_heads=4)
    cfg = Mamba2Config(hidden_size=32, num_heads=4, head_dim=8, state_size=8, n_groups=4, expand=1,
                       conv_kernel=4, use_conv_bias=True, use_bias=False, chunk_size=16,
                       layer_norm_epsilon=1e-5, num_hidden_layers=1)
    mixer = Mamba2Mixer(cfg, layer_idx=0).double().eval()
    mixer.load_state_dict(layer.state_dict())
    x = inputs(T=37)
    with torch.no_grad():
        close(layer(x), mixer(x), EXACT)


def test_mamba2_kv_groups_repeat_after_conv():
    """H_kv = 2 < H = 4 equals a H_kv = 4 layer whose x / B rows (projection and depthwise conv) are the
    kv-group rows repeated per head (head h reads group h // 2): conv-then-repeat == repeat-then-conv."""
    small = make_layer("mamba2")
    big = make_layer("mamba2", num_key_value_heads=4)
    d_inner, d_xb, P = 32, 16, 8
    sd = small.state_dict()

    def rep(t):  # [Hkv * P, ...] -> [H * P, ...], each group's P rows repeated for its 2 heads
        return t.reshape(2, P, *t.shape[1:]).repeat_interleave(2, dim=0).reshape(4 * P, *t.shape[1:])

    def expand(t):  # rows [z | x | B | C | dt] (in_proj) or [x | B | C] (conv)
        z_len = d_inner if t.shape[0] == sd["in_proj.weight"].shape[0] else 0
        z, x, b, rest = t.split([z_len, d_xb, d_xb, t.shape[0] - z_len - 2 * d_xb])
        return torch.cat([z, rep(x), rep(b), rest])

    big_sd = dict(sd, **{"in_proj.weight": expand(sd["in_proj.weight"]), "conv1d.weight": expand(sd["conv1d.weight"]),
                         "conv1d.bias": expand(sd["conv1d.bias"])})
    big.load_state_dict(big_sd)
    x = inputs(T=21)
    close(small(x), big(x), EXACT)
