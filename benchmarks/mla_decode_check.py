"""MLA decode kernel on the GPU: parity with the reference, achieved bandwidth; prefill attention backends; the
kernel count of one eager decode step.

1. parity: ops.mla_decode_triton vs a float64 softmax on the same device, widths 128+32, 128+64, 256+64,
   512+64, float32 (tol 1e-4: ieee dots, float32 softmax) and bfloat16 (tol 2e-2), S = 5000 and 70000, several
   lengths per batch row; the output is poisoned (filled with NaN) first and must be finite.
2. decode timing at S = 8K .. 2M (H = 32 heads, batch 1): kernel vs reference (CUDA events, median of
   do_bench); bytes = S (r + rope) 2 (the cache, read once); bandwidth = bytes / time.
3. prefill attention for MLA's head dims (q/k 64 | v 64 and 128 | 128, GQA 32/8 and 24/8, one 16K chunk over
   a 128K cache, bottom-right causal): flash (aten entry, the current path), cuDNN and efficient SDPA backends.
4. profile: CUDA kernels launched by one eager decode step of the 1B 4MLA12GDN hybrid at 8K (names, counts,
   time), the data for fusing small projections.

    PYTHONPATH=. python benchmarks/mla_decode_check.py --out $OUT
Writes OUT/mla_decode_check.json after every part.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch


from hylo_lab.ops import mla_decode as md

K = 1024
WIDTHS = [(128, 32), (128, 64), (256, 64), (512, 64)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def parity(res):
    for dtype in (torch.float32, torch.bfloat16):
        for rank, rope in WIDTHS:
            for S, B in ((5000, 3), (70000, 1)):
                q = torch.randn(B, 32, rank + rope, device="cuda").to(dtype)
                kv = torch.randn(B, S, rank + rope, device="cuda").to(dtype)
                length = torch.tensor([S - 3, S // 2, 17][:B], device="cuda")
                ref = md.mla_decode_reference(q.double(), kv.double(), length, rank, 0.1)
                out = md.mla_decode_triton(q, kv, length, rank, 0.1)
                err = rel(out, ref) if torch.isfinite(out).all() else float("inf")
                res.append(dict(dtype=str(dtype), rank=rank, rope=rope, S=S, B=B, err=err, ok=err < TOL[dtype]))
                print(res[-1], flush=True)


def timing(res, lengths):
    from triton.testing import do_bench

    for rank, rope in WIDTHS[:3]:
        for S in lengths:
            try:
                q = torch.randn(1, 32, rank + rope, device="cuda", dtype=torch.bfloat16)
                kv = torch.randn(1, S, rank + rope, device="cuda", dtype=torch.bfloat16)
                length = torch.tensor([S], device="cuda")
                row = dict(rank=rank, rope=rope, S=S, bytes=S * (rank + rope) * 2, plan=md.plan(1, 32, S, rank, rope, kv.device))
                row["kernel_ms"] = do_bench(lambda: md.mla_decode_triton(q, kv, length, rank, 0.1), warmup=25, rep=100,
                                            return_mode="median")
                row["reference_ms"] = do_bench(lambda: md.mla_decode_reference(q, kv, length, rank, 0.1), warmup=25,
                                               rep=100, return_mode="median")
                row["kernel_TBps"] = row["bytes"] / row["kernel_ms"] / 1e9
                row["reference_TBps"] = row["bytes"] / row["reference_ms"] / 1e9
                res.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "plan"}, flush=True)
                del q, kv
                torch.cuda.empty_cache()
            except Exception as exc:
                res.append(dict(rank=rank, rope=rope, S=S, error=f"{type(exc).__name__}: {str(exc)[:200]}"))


def prefill(res):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from triton.testing import do_bench

    T, S = 16 * K, 128 * K
    for H, Hkv, D in ((32, 8, 64), (24, 8, 128)):
        q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        flops = 4 * H * D * T * (S - T / 2)
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        ref = flash(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), 0.0, True, False)[0]
        cands = {"flash_aten_gqa": lambda: flash(q, k, v, 0.0, True, False)[0]}
        kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        bias = causal_lower_right(T, S)
        for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                         ("flash_sdpa", SDPBackend.FLASH_ATTENTION)):
            def fn(be=be):
                with sdpa_kernel([be]):
                    return F.scaled_dot_product_attention(q, kr, vr, attn_mask=bias)
            cands[name] = fn
        for name, fn in cands.items():
            row = dict(H=H, Hkv=Hkv, D=D, T=T, S=S, backend=name)
            try:
                err = rel(fn(), ref)
                ms = do_bench(fn, warmup=5, rep=50, return_mode="median")
                row.update(err=err, ms=ms, tflops=flops / ms / 1e9)
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            res.append(row)
            print(row, flush=True)
        del q, k, v, kr, vr
        torch.cuda.empty_cache()


def profile(res):
    from hylo_lab import HyloConfig
    from hylo_lab.inference import allocate_cache, chunked_prefill, decode_step
    from hylo_lab.model import HyloForCausalLM

    with torch.device("cuda"):
        model = HyloForCausalLM(HyloConfig.from_preset("llama3.2-1b/4MLA12GDN", kernel_backend="auto"))
    model = model.to(dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (1, 8 * K), device="cuda")
    cache = allocate_cache(model, 1, 8 * K + 8)
    with torch.no_grad():
        tok = chunked_prefill(model, ids, cache).argmax(-1, keepdim=True)
        for _ in range(2):
            tok = decode_step(model, tok, cache).argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode_step(model, tok, cache)
            torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name[:90], [0, 0.0])
            r[0] += 1
            r[1] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])
    res.append(dict(kernels=sum(c for c, _ in rows.values()), gpu_us=sum(t for _, t in rows.values()),
                    top=[dict(name=n, count=c, us=t) for n, (c, t) in top[:40]]))
    print({k: v for k, v in res[-1].items() if k != "top"}, flush=True)
    for r in res[-1]["top"][:25]:
        print(r, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="parity,timing,prefill,profile")
    p.add_argument("--lengths", default="8192,131072,524288,2097152")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    for part in a.parts.split(","):
        res = results.setdefault(part, [])
        try:
            if part == "timing":
                timing(res, [int(x) for x in a.lengths.split(",")])
            else:
                globals()[part](res)
        except Exception:
            res.append(dict(error=traceback.format_exc()[-1500:]))
            print(res[-1]["error"], flush=True)
        (out / "mla_decode_check.json").write_text(json.dumps(results, indent=1))
    bad = [r for r in results.get("parity", []) if not r.get("ok")]
    print("parity failures:", len(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
