"""Long-context inference: chunked prefill into a preallocated cache + static decode == one full forward.

Tiny fp32 model on CPU (MLA + GDN + Mamba2 layers); tolerance 1e-4 absolute on logits of magnitude ~1
(fp32 summation order differs between one pass, chunks, and the absorbed vs expanded MLA forms).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from hylo_lab import HyloConfig  # noqa: F401  (registers the model type)
from hylo_lab.cache import HyloCache, MLAState
from hylo_lab.inference import (GraphDecoder, allocate_cache, chunked_prefill, decode_step, greedy_decode,
                                pack_decode_projections)
from hylo_lab.model import HyloForCausalLM

TOL = 1e-4
MIXERS = ("mla", "gdn", "mamba2", "mla")


def tiny_model(seed=0, dtype=torch.float32, device="cpu", mixers=MIXERS):
    torch.manual_seed(seed)
    model = HyloForCausalLM(tiny_config(mixers=mixers, chunk_size=8, initializer_range=0.1)).to(device, dtype)
    return model.eval()


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


# 37 tokens in chunks of 16: two full chunks and a ragged one, each crossing the ops' 8-token chunks
@pytest.mark.parametrize("chunk", [16, 37, 5], ids=lambda c: f"chunk{c}")
def test_chunked_prefill_then_static_decode_equals_full_forward(chunk):
    model = tiny_model()
    T, new = 37, 6
    ids = torch.randint(0, model.config.vocab_size, (2, T + new))
    ref = full_logits(model, ids)
    cache = allocate_cache(model, batch_size=2, max_length=T + new)
    logits = chunked_prefill(model, ids[:, :T], cache, chunk_size=chunk)
    torch.testing.assert_close(logits, ref[:, T - 1], rtol=0, atol=TOL)
    assert cache.seq_length == T and int(cache.position) == T
    for i in range(new):  # teacher-forced decode: each step sees the true next token
        logits = decode_step(model, ids[:, T + i:T + i + 1], cache)
        torch.testing.assert_close(logits, ref[:, T + i], rtol=0, atol=TOL)
    assert cache.seq_length == T + new and int(cache.position) == T + new


def test_preallocated_cache_never_reallocates():
    model = tiny_model()
    cache = allocate_cache(model, batch_size=1, max_length=40)
    mla = [st for st in cache.layers if isinstance(st, MLAState)]
    rec = [st.recurrent for st in cache.layers if not isinstance(st, MLAState)]
    ptrs = [st.kv.data_ptr() for st in mla] + [t.data_ptr() for t in rec]
    ids = torch.randint(0, model.config.vocab_size, (1, 33))
    chunked_prefill(model, ids, cache, chunk_size=8)
    greedy_decode(model, ids[:, -1:], cache, 3)
    after = [st.kv.data_ptr() for st in mla] + [st.recurrent.data_ptr() for st in cache.layers
                                                if not isinstance(st, MLAState)]
    assert ptrs == after
    assert all(st.length == 36 for st in mla)
    with pytest.raises(ValueError, match="cache holds 40 tokens"):
        chunked_prefill(model, ids[:, :5], cache)


def test_growing_cache_doubles_instead_of_concatenating():
    st = MLAState()
    caps = []
    for _ in range(40):
        st.append(torch.randn(1, 3, 4), torch.randn(1, 3, 2))
        caps.append(st.capacity)
    assert st.length == 120 and st.latent.shape == (1, 120, 4) and st.k_rope.shape == (1, 120, 2)
    assert len(set(caps)) <= 5  # 16 -> 32 -> 64 -> 128 (+ the first): a handful of reallocations, not 40


def test_default_cache_generation_matches_static_decode():
    """model.forward with an ordinary HyloCache (absorbed MLA decode over the growing cache) == the static path."""
    model = tiny_model(seed=1)
    ids = torch.randint(0, model.config.vocab_size, (1, 20))
    cache = HyloCache(model.config)
    with torch.no_grad():
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok, dyn = out.logits[:, -1:].argmax(-1), []
        for _ in range(4):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            dyn.append(tok)
    static = allocate_cache(model, batch_size=1, max_length=32)
    first = chunked_prefill(model, ids, static, chunk_size=7).argmax(-1, keepdim=True)
    assert torch.equal(greedy_decode(model, first, static, 4), torch.cat(dyn, 1))


def decode_logits(model, ids, T, steps=4):
    """Prefill ids[:, :T], then teacher-forced static decode steps: their logits [steps, B, vocab]."""
    cache = allocate_cache(model, batch_size=ids.shape[0], max_length=T + steps)
    chunked_prefill(model, ids[:, :T], cache, chunk_size=7)
    return torch.stack([decode_step(model, ids[:, T + i:T + i + 1], cache) for i in range(steps)])


def kernel_ops(fn):
    """How many non-view aten ops `fn` dispatches (each launches a kernel on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


@pytest.mark.parametrize("overrides", [{}, {"gdn_use_gate": False}, {"gdn_use_short_conv": False}],
                         ids=["gate+conv", "no_gate", "no_conv"])
def test_packed_gdn_decode_equals_unpacked_in_float64(overrides):
    """pack_decode_projections: one stacked projection and one short conv per GDN decode step give the unpacked
    step's logits (float64, 1e-12) with fewer kernels, and the copy is rebuilt when a weight changes in place."""
    torch.manual_seed(0)
    cfg = tiny_config(mixers=("gdn", "mla", "gdn"), chunk_size=8, initializer_range=0.1, **overrides)
    model = HyloForCausalLM(cfg).to(torch.float64).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 21))
    ref = decode_logits(model, ids, 17)
    unpacked_ops = kernel_ops(lambda: decode_logits(model, ids, 17, steps=1))
    nbytes = pack_decode_projections(model)
    gdn = [m for m in model.modules() if hasattr(m, "packed_decode")]
    assert nbytes == sum(m.packed_nbytes for m in gdn) > 0
    torch.testing.assert_close(decode_logits(model, ids, 17), ref, rtol=0, atol=1e-12)
    packed_ops = kernel_ops(lambda: decode_logits(model, ids, 17, steps=1))
    saved = 5 + (1 if cfg.gdn_use_gate else 0) + (6 if cfg.gdn_use_short_conv else 0)  # 2 GDN layers
    assert packed_ops <= unpacked_ops - saved, (packed_ops, unpacked_ops)
    with torch.no_grad():
        gdn[1].v_proj.weight.mul_(1.5)  # an in-place update: the packed copy must follow it
    packed = decode_logits(model, ids, 17)
    assert pack_decode_projections(model, enable=False) == 0 and gdn[1]._packed is None
    torch.testing.assert_close(packed, decode_logits(model, ids, 17), rtol=0, atol=1e-12)
    assert (packed - ref).abs().max() > 1e-3  # the update did change the logits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("pack", [False, True], ids=["unpacked", "packed"])
def test_cuda_graph_decode_equals_eager(compile, pack):
    model = tiny_model(dtype=torch.float32, device="cuda")
    pack_decode_projections(model, enable=pack)
    ids = torch.randint(0, model.config.vocab_size, (1, 50), device="cuda")
    eager_cache = allocate_cache(model, 1, 64)
    first = chunked_prefill(model, ids, eager_cache, chunk_size=16).argmax(-1, keepdim=True)
    eager = greedy_decode(model, first, eager_cache, 8)
    graph_cache = allocate_cache(model, 1, 64)
    chunked_prefill(model, ids, graph_cache, chunk_size=16)
    assert torch.equal(GraphDecoder(model, graph_cache, compile=compile).generate(first, 8), eager)


def test_benchmark_smoke_modes_run(tmp_path):
    """The GPU benchmarks' --smoke modes run on CPU with tiny shapes and write their JSON + markdown (the two
    scripts run side by side: ~5 s of CPU each)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    extra = {"kernel_check": [], "long_context": ["--pack-decode"]}
    procs = {name: subprocess.Popen([sys.executable, str(root / "benchmarks" / f"{name}.py"), "--smoke", "--out",
                                     str(tmp_path), *extra[name]], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
             for name in ("kernel_check", "long_context")}
    for name, p in procs.items():
        log = p.communicate(timeout=120)[0].decode()
        assert p.returncode == 0, log[-3000:]
        assert (tmp_path / f"{name}.json").exists() and (tmp_path / f"{name}.md").exists()
    rows = json.loads((tmp_path / "kernel_check.json").read_text())["rows"]
    assert rows and all(r.get("pass") for r in rows), [r for r in rows if not r.get("pass")]
    rows = json.loads((tmp_path / "long_context.json").read_text())["rows"]
    assert {r["status"] for r in rows} == {"ok"} and (tmp_path / "long_context.png").exists()
    assert all(r["pack_decode"] for r in rows) and any(r["packed_bytes"] > 0 for r in rows)


def test_long_context_benchmark_resumes_per_length(tmp_path):
    """A second call keeps the lengths the first one measured (same row, same numbers) and adds the new ones."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))

    def call(*lengths):
        cmd = [sys.executable, str(root / "benchmarks" / "long_context.py"), "--smoke", "--out", str(tmp_path),
               "--models", "llama3.2-3b/14MLA14GDN", "llama3.2-1b/4MLA12GDN", "--lengths", *lengths]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return {(r["model"], r["length"]): r for r in json.loads((tmp_path / "long_context.json").read_text())["rows"]}

    first = call("40")
    assert set(first) == {("llama3.2-1b/4MLA12GDN", 40), ("llama3.2-3b/14MLA14GDN", 40)}
    second = call("40", "72")
    assert ("llama3.2-1b/4MLA12GDN", 72) in second
    for key, row in first.items():
        assert second[key]["ttft_s"] == row["ttft_s"]  # kept, not measured again
