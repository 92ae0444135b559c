"""MLA decode over the latent cache: the reference against a float64 softmax, the MLA layer's static decode
against its full forward, and the split-K Triton kernel against the reference.

The kernel test runs wherever triton imports: on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (a separate
environment: the main install stays triton-free). Tolerances, ||kernel - ref|| / ||ref||, reference in float64:
float32 1e-5 (ieee dots), bfloat16 2e-2 (bf16 inputs and probabilities, float32 accumulation).
"""

import os

import pytest
import torch

from conftest import tiny_config
from hylo_lab.ops import mla_decode as md

# (rank, rope): the 1B presets' 128+32, the 3B's 128+64, Qwen3's 256+64, DeepSeek's 512+64, and a tiny odd one
WIDTHS = [(128, 32), (128, 64), (256, 64), (512, 64), (24, 8)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def softmax_f64(q, kv, length, rank, scale):
    """The definition, per batch row and head, in float64."""
    out = torch.empty(q.shape[0], q.shape[1], rank, dtype=torch.float64)
    for b in range(q.shape[0]):
        n = int(length[b] if length.numel() > 1 else length[0])
        s = scale * q[b].double() @ kv[b, :n].double().T
        out[b] = torch.softmax(s, -1) @ kv[b, :n, :rank].double()
    return out


def inputs(B, H, S, rank, rope, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, rank + rope, generator=g).to(device, dtype)
    kv = torch.randn(B, S, rank + rope, generator=g).to(device, dtype)
    length = torch.tensor([S - 7, S // 3, 1][:B], device=device)  # a full-ish row, a short one, one token
    return q, kv, length


# lengths per batch row, one token included; S=300 leaves unused rows at the end of the buffer
@pytest.mark.parametrize("rank,rope", [(128, 32), (24, 8)], ids=lambda w: str(w))
def test_reference_matches_softmax_definition(rank, rope):
    q, kv, length = inputs(3, 4, 300, rank, rope, torch.float64)
    out = md.mla_decode_reference(q, kv, length, rank, 0.1)
    torch.testing.assert_close(out, softmax_f64(q, kv, length, rank, 0.1), rtol=0, atol=1e-12)


def test_static_decode_matches_full_forward_with_bias_and_gqa():
    from hylo_lab.cache import HyloCache
    from hylo_lab.layers.mla import MLA
    from hylo_lab.model import HyloModel

    torch.manual_seed(0)
    cfg = tiny_config(mixers=("mla",), mla_bias=True, num_attention_heads=4, mla_num_kv_heads=2)
    model = HyloModel(cfg).double().eval()
    layer = next(m for m in model.modules() if isinstance(m, MLA))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)  # non-zero biases

    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).last_hidden_state
        cache = HyloCache(cfg, batch_size=2, max_length=20, dtype=torch.float64, static=True)
        model(input_ids=ids[:, :10], position_ids=torch.arange(10)[None].expand(2, -1), past_key_values=cache,
              use_cache=True)
        for t in range(10, 13):  # each static step writes at `position` and advances it
            h = model(input_ids=ids[:, t:t + 1], position_ids=cache.position.view(1, 1).expand(2, 1),
                      past_key_values=cache, use_cache=True).last_hidden_state
            torch.testing.assert_close(h[:, 0], full[:, t], rtol=0, atol=1e-10)
        assert int(cache.position) == 13


def kernel_device():
    if not md.triton_available():
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("rank,rope", WIDTHS, ids=lambda w: str(w))
def test_triton_kernel_matches_reference(rank, rope, dtype):
    device = kernel_device()
    if device is None:
        pytest.skip("triton is not importable here (or no CUDA and TRITON_INTERPRET is not 1)")
    B, H, S = 3, 5, 333  # 5 heads: a partial head block; 333 rows: a ragged last split
    q, kv, length = inputs(B, H, S, rank, rope, dtype, device)
    ref = softmax_f64(q.cpu(), kv.cpu(), length.cpu(), rank, 0.125)
    block_n = md.plan(B, H, S, rank, rope, kv.device)["BLOCK_N"]
    for split in (None, block_n, 2 * block_n):  # the planned split, then many small ones (empty ones included)
        out = md.mla_decode_triton(q, kv, length, rank, 0.125, split=split)
        assert out.dtype == dtype and out.shape == (B, H, rank)
        assert torch.isfinite(out).all()
        assert rel(out.cpu(), ref) < TOL[dtype], (split, rel(out.cpu(), ref))
    assert rel(md.mla_decode(q, kv, length, rank, 0.125).cpu(), ref) < TOL[dtype]  # "auto" dispatches to the kernel
