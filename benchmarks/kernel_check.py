"""Every fast path against its pure-PyTorch reference (forward, final state, gradients), then timed.

Fast paths (what `backend="auto"` / the layers pick on CUDA):
  gdn_chunk        ops.gated_delta_rule, T > 1  -> fla chunk_gated_delta_rule (prefill / training)
  gdn_recurrent    ops.gated_delta_rule, T = 1  -> fla fused_recurrent_gated_delta_rule (decode)
  ssd_chunk        ops.ssd, T > 1               -> mamba-ssm mamba_chunk_scan_combined if importable, else
                                                   fla chunk_simple_gla (q = C, k = B, v = dt x, g = dt A)
  ssd_chunk_gla    the same through fla chunk_gla (the head's log decay on every key dim): what ops.ssd trains
                   with when fla refuses chunk_simple_gla's backward (Hopper, triton < 3.7.1)
  ssd_recurrent    ops.ssd, T = 1               -> mamba-ssm selective_state_update, else fla fused_recurrent_simple_gla
  mla_prefill      layers.attention.prefill_attention: flash attention, GQA heads, bottom-right causal over a
                   cache (past > 0), V padded to the QK dim
  mla_decode       MLA layer decode over a preallocated latent cache (absorbed, never expanding K/V, static
                   shapes), vs the same layer's full expanded forward in float64
References run in float64 on the same device (the chunked forms, which CPU tests check against the step-by-step
recurrences). Error = ||fast - ref|| / ||ref|| per output; NaN never passes.

Tolerances (relative L2):       forward / state    gradients
  float32 inputs                  2e-3               5e-3      (fla's fp32 dots run in tf32)
  bfloat16 inputs                 2e-2               5e-2
Gradients are checked where the fast path has a backward that runs here; fla 0.6 refuses its gated chunk
backward on Hopper with triton < 3.7.1 without tilelang: that is recorded as "refused", and the model then
trains on the next kernel whose backward runs, else the reference (ops/dispatch.py fla_chunk_choice).

    PYTHONPATH=. python benchmarks/kernel_check.py --out benchmarks/results          # GPU, ~1-2 min
    PYTHONPATH=. python benchmarks/kernel_check.py --smoke --out /tmp/kc             # tiny shapes, CPU
Writes OUT/kernel_check.json (after every check) and OUT/kernel_check.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F


from hylo_lab.ops import dispatch
from hylo_lab.ops.gated_delta import chunked_gated_delta_rule, gated_delta_rule
from hylo_lab.ops.ssd import _fla_ssd, chunked_ssd, ssd

TOL = {"float32": dict(fwd=2e-3, grad=5e-3), "bfloat16": dict(fwd=2e-2, grad=5e-2)}
FULL = dict(check_T=1024, bench_T=32768, gdn=(6, 256, 512), ssd=(32, 64, 64), mla_T=2048, mla_past=6144,
            mla_bench=(16384, 131072), decode_S=4096, decode_bench_S=131072, reps=20, train_T=8192)
SMOKE = dict(check_T=40, bench_T=64, gdn=(2, 16, 32), ssd=(2, 8, 8), mla_T=24, mla_past=40,
             mla_bench=(32, 96), decode_S=40, decode_bench_S=80, reps=1, train_T=100)


def rel(a, b):
    a, b = a.double(), b.double()
    err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else float("inf")


def bench(fn, device, reps):
    """Median milliseconds over `reps` calls after 2 warm-up calls (CUDA events on GPU)."""
    for _ in range(2 if reps > 1 else 1):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


class Checker:
    def __init__(self, args):
        self.args, self.s = args, SMOKE if args.smoke else FULL
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows = []
        self.meta = dict(device=torch.cuda.get_device_name() if self.device.type == "cuda" else platform.processor() or "cpu",
                         torch=torch.__version__, smoke=args.smoke, tolerances=TOL,
                         fla=dispatch.kernel_available("fla"), mamba_ssm=dispatch.kernel_available("mamba_ssm"),
                         fla_backward_refused={op: dispatch.fla_backward_refused(op) for op in dispatch.FLA_CHUNK_OPS})
        try:
            import triton
            self.meta["triton"] = triton.__version__
        except Exception:
            pass

    def save(self):
        (self.out / "kernel_check.json").write_text(json.dumps(dict(meta=self.meta, rows=self.rows), indent=2))
        lines = [f"# kernel check ({self.meta['device']}, torch {self.meta['torch']}, smoke={self.meta['smoke']})", "",
                 "Relative L2 error of each fast path vs its float64 PyTorch reference; tolerances "
                 + ", ".join(f"{k}: fwd/state {v['fwd']:g}, grad {v['grad']:g}" for k, v in TOL.items()) + ".", "",
                 "| check | path | dtype | shape | fwd err | state err | max grad err | grads | pass | fast ms | ref ms | bench |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            g = r.get("grad_err") or {}
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                r["check"], r.get("path", ""), r.get("dtype", ""), r.get("shape", ""), _f(r.get("fwd_err")),
                _f(r.get("state_err")), _f(max(g.values()) if g else None), r.get("grad_status", ""),
                {True: "yes", False: "NO"}.get(r.get("pass"), r.get("status", "")), _f(r.get("fast_ms")),
                _f(r.get("ref_ms")), r.get("bench", "")))
        (self.out / "kernel_check.md").write_text("\n".join(lines) + "\n")

    def run(self, name, fn, dtype):
        if not self.args.checks or name in self.args.checks.split(","):
            row = dict(check=name, dtype=str(dtype).replace("torch.", ""))
            try:
                row.update(fn(dtype))
                tol = TOL[row["dtype"]]
                ok = row["fwd_err"] <= tol["fwd"] and (row.get("state_err") is None or row["state_err"] <= tol["fwd"])
                if row.get("grad_err"):
                    ok = ok and max(row["grad_err"].values()) <= tol["grad"]
                row["pass"] = bool(ok)
            except Exception as exc:
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}",
                           trace=traceback.format_exc()[-1500:])
            print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
            self.rows.append(row)
            self.save()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def grads(self, fast, ref, inputs, names, row, fla_op=None):
        """Backward of a random cotangent through fast and ref (float64 copies); fills grad_err/grad_status.
        fla_op: the fast path is fla's chunk kernel for this op (dispatch.FLA_CHUNK_OPS), whose backward
        fla refuses on some GPUs: dispatch's rule and probe decide, and a refusal is recorded, not attempted."""
        refused = dispatch.backward_decision(fla_op, str(self.device)) if fla_op else None
        if refused:
            row["grad_status"], row["grad_error"] = "refused", refused
            return
        try:
            outs = fast()
            cot = [torch.randn_like(o) for o in outs]
            gf = torch.autograd.grad(outs, inputs, cot, allow_unused=True)
        except RuntimeError as exc:
            row["grad_status"] = "refused" if "Triton" in str(exc) or "tilelang" in str(exc) else "error"
            row["grad_error"] = str(exc)[:200]
            return
        ref_in = [x.detach().double().requires_grad_() for x in inputs]
        ro = ref(*ref_in)
        gr = torch.autograd.grad(ro, ref_in, [c.double() for c in cot], allow_unused=True)
        row["grad_err"] = {n: rel(a, b) for n, a, b in zip(names, gf, gr) if a is not None and b is not None}
        row["grad_status"] = "checked"

    # ---- gated delta rule -------------------------------------------------------------------------------
    def gdn_inputs(self, T, dtype, grad=False):
        H, K, V = self.s["gdn"]
        d = self.device
        q = torch.randn(1, T, H, K, device=d, dtype=dtype)
        k = torch.randn(1, T, H, K, device=d, dtype=dtype)
        v = torch.randn(1, T, H, V, device=d, dtype=dtype)
        g = F.logsigmoid(torch.randn(1, T, H, device=d) + 3).float()  # decays in (0, 1), mostly near 1
        beta = torch.rand(1, T, H, device=d, dtype=dtype)
        h0 = torch.randn(1, H, K, V, device=d) * 0.1
        xs = [q, k, v, g, beta, h0]
        return [x.requires_grad_(grad) for x in xs]

    def check_gdn(self, T, dtype):
        grad = T > 1
        xs = self.gdn_inputs(T, dtype, grad)
        mode = "fla" if dispatch.use_kernel("fla", "auto", *xs) else "torch"

        def fast(*a):
            a = a or xs
            return gated_delta_rule(*a[:5], initial_state=a[5], use_qk_l2norm=True, backend=mode)

        def ref(*a):
            return chunked_gated_delta_rule(*a[:5], initial_state=a[5], use_qk_l2norm=True)

        with torch.no_grad():
            o, s = fast()
            ro, rs = ref(*[x.detach().double() for x in xs])
        path = ("fla chunk_gated_delta_rule" if T > 1 else "fla fused_recurrent_gated_delta_rule") if mode == "fla" \
            else "torch reference (no fla)"
        row = dict(path=path, shape=f"T={T} H,K,V={self.s['gdn']}", fwd_err=rel(o, ro), state_err=rel(s, rs))
        if grad:
            self.grads(fast, ref, xs, ["q", "k", "v", "g", "beta", "h0"], row, fla_op="gated_delta" if mode == "fla" else None)
        Tb = self.s["bench_T"] if T > 1 else 1
        xb = self.gdn_inputs(Tb, dtype)
        with torch.no_grad():
            row["fast_ms"] = bench(lambda: gated_delta_rule(*xb[:5], initial_state=xb[5], use_qk_l2norm=True,
                                                            backend=mode), self.device, self.s["reps"])
            row["ref_ms"] = bench(lambda: ref(*xs), self.device, max(1, min(3, self.s["reps"])))
        row["bench"] = f"fast at T={Tb}, ref at T={T}"
        return row

    # ---- SSD --------------------------------------------------------------------------------------------
    def ssd_inputs(self, T, dtype, grad=False):
        H, N, P = self.s["ssd"]
        d = self.device
        x = torch.randn(1, T, H, P, device=d, dtype=dtype)
        dt = F.softplus(torch.randn(1, T, H, device=d) - 3).float()
        A = -torch.rand(H, device=d).float() * 4 - 0.5
        B = torch.randn(1, T, H, N, device=d, dtype=dtype) * 0.5
        C = torch.randn(1, T, H, N, device=d, dtype=dtype) * 0.5
        h0 = torch.randn(1, H, N, P, device=d) * 0.1
        return [t.requires_grad_(grad) for t in (x, dt, A, B, C, h0)]

    def check_ssd(self, T, dtype, gla=False):
        grad = T > 1
        xs = self.ssd_inputs(T, dtype, grad)
        if gla:
            mode, path = "gla", "fla chunk_gla"
        elif dispatch.use_kernel("mamba_ssm", "auto", *xs):
            mode, path = "mamba_ssm", "mamba-ssm " + ("mamba_chunk_scan_combined" if T > 1 else "selective_state_update")
        elif dispatch.use_kernel("fla", "auto", *xs):
            mode, path = "fla", "fla " + ("chunk_simple_gla" if T > 1 else "fused_recurrent_simple_gla")
        else:
            mode, path = "torch", "torch reference (no kernel)"

        def fast(*a):
            a = a or xs
            if mode == "gla":
                return _fla_ssd(*a[:5], initial_state=a[5], output_final_state=True, gated_keys=True)
            return ssd(*a[:5], initial_state=a[5], backend=mode)

        def ref(*a):
            return chunked_ssd(*a[:5], initial_state=a[5])

        with torch.no_grad():
            y, s = fast()
            ry, rs = ref(*[t.detach().double() for t in xs])
        row = dict(path=path, shape=f"T={T} H,N,P={self.s['ssd']}", fwd_err=rel(y, ry), state_err=rel(s, rs))
        if grad:
            self.grads(fast, ref, xs, ["x", "dt", "A", "B", "C", "h0"], row, fla_op={"fla": "simple_gla", "gla": "gla"}.get(mode))
        Tb = self.s["bench_T"] if T > 1 else 1
        xb = self.ssd_inputs(Tb, dtype)
        with torch.no_grad():
            row["fast_ms"] = bench(lambda: fast(*xb), self.device, self.s["reps"])
            row["ref_ms"] = bench(lambda: ref(*xs), self.device, max(1, min(3, self.s["reps"])))
        row["bench"] = f"fast at T={Tb}, ref at T={T}"
        return row

    # ---- MLA prefill attention --------------------------------------------------------------------------
    def check_mla_prefill(self, dtype, past):
        from hylo_lab.layers.attention import causal_sdpa, prefill_attention

        H, Hkv, D, Dv = (32, 8, 64, 64) if not self.args.smoke else (4, 2, 16, 8)
        T = self.s["mla_T"]
        d = self.device

        def inputs(T, past, grad):
            q = torch.randn(1, H, T, D, device=d, dtype=dtype, requires_grad=grad)
            k = torch.randn(1, Hkv, past + T, D, device=d, dtype=dtype, requires_grad=grad)
            v = torch.randn(1, Hkv, past + T, Dv, device=d, dtype=dtype, requires_grad=grad)
            return [q, k, v]

        def ref(q, k, v, p=past):
            rep = H // Hkv
            return (causal_sdpa(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), p, scale=D ** -0.5),)

        xs = inputs(T, past, past == 0)
        fast = lambda *a: (prefill_attention(*(a or xs), past, scale=D ** -0.5),)  # noqa: E731
        with torch.no_grad():
            o = fast()[0]
            ro = ref(*[x.detach().double() for x in xs])[0]
        flash = d.type == "cuda" and dtype != torch.float32
        row = dict(path="flash (aten), GQA, bottom-right causal" if flash else "repeat K/V + SDPA (reference)",
                   shape=f"T={T} past={past} H={H} Hkv={Hkv} D={D} Dv={Dv}", fwd_err=rel(o, ro))
        if past == 0:
            self.grads(fast, ref, xs, ["q", "k", "v"], row)
        Tb, Sb = self.s["mla_bench"]
        xb = inputs(Tb, Sb - Tb, False)
        with torch.no_grad():
            row["fast_ms"] = bench(lambda: prefill_attention(*xb, Sb - Tb, scale=D ** -0.5), self.device, self.s["reps"])
            row["ref_ms"] = bench(lambda: ref(*xs), self.device, max(1, min(3, self.s["reps"])))
        row["bench"] = f"fast: {Tb} queries over {Sb} keys; ref at the check shape"
        return row

    # ---- MLA decode over the latent cache -----------------------------------------------------------------
    def check_mla_decode(self, dtype):
        from hylo_lab.cache import MLAState
        from hylo_lab.config import HyloConfig
        from hylo_lab.layers.common import Rotary
        from hylo_lab.layers.mla import MLA

        if self.args.smoke:
            cfg = HyloConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             num_hidden_layers=1, layout="1MLA", kv_lora_rank=24, q_lora_rank=32,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
        else:
            cfg = HyloConfig.from_preset("llama3.2-1b/4MLA12GDN")
        torch.manual_seed(0)
        layer = MLA(cfg, 0).to(self.device, torch.float64)
        rot = Rotary(cfg.qk_rope_head_dim, cfg.mla_rope_parameters, cfg.max_position_embeddings)
        S = self.s["decode_S"]
        x = torch.randn(1, S + 1, cfg.hidden_size, device=self.device, dtype=torch.float64)
        pos = torch.arange(S + 1, device=self.device)[None]
        with torch.no_grad():
            ref = layer(x, rope=rot(pos, torch.float64))[:, -1]
            fl = layer.to(dtype)
            xd = x.to(dtype)
            st = MLAState().allocate(1, S + 8, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device=self.device,
                                     dtype=dtype, position=torch.tensor([S], device=self.device))
            fl(xd[:, :S], rope=rot(pos[:, :S], dtype), state=st)
            step = lambda: fl(xd[:, S:], rope=rot(pos[:, S:], dtype), state=st)  # noqa: E731
            o = step()[:, -1]
            row = dict(path="absorbed latent attention, static buffer + position mask", fwd_err=rel(o, ref),
                       shape=f"S={S} H={cfg.num_attention_heads} r={cfg.kv_lora_rank} rope={cfg.qk_rope_head_dim}")
            Sb = self.s["decode_bench_S"]
            stb = MLAState().allocate(1, Sb + 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim, device=self.device,
                                      dtype=dtype, position=torch.tensor([Sb], device=self.device))
            stb.kv.normal_()
            stb.length = Sb
            row["fast_ms"] = bench(lambda: fl(xd[:, S:], rope=rot(pos[:, S:], dtype), state=stb), self.device,
                                   self.s["reps"])
            row["bench"] = f"one decode step over S={Sb} cached tokens"
        return row

    def check_chunked_prefill_cost(self, dtype):
        """Timing only: causal attention over S tokens in one call vs in --chunk pieces over the growing prefix
        (what chunked prefill does); equal FLOPs, so the ratio is the cost of chunking."""
        from hylo_lab.layers.attention import prefill_attention

        H, Hkv, D = (32, 8, 64) if not self.args.smoke else (4, 2, 16)
        S, C = (131072, 16384) if not self.args.smoke else (64, 16)
        d = self.device
        q = torch.randn(1, H, S, D, device=d, dtype=dtype)
        k = torch.randn(1, Hkv, S, D, device=d, dtype=dtype)
        v = torch.randn(1, Hkv, S, D, device=d, dtype=dtype)
        with torch.no_grad():
            one = bench(lambda: prefill_attention(q, k, v, 0), self.device, 3)
            chunked = bench(lambda: [prefill_attention(q[:, :, s:s + C], k[:, :, :s + C], v[:, :, :s + C], s)
                                     for s in range(0, S, C)], self.device, 3)
            o1 = prefill_attention(q, k, v, 0)
            o2 = torch.cat([prefill_attention(q[:, :, s:s + C], k[:, :, :s + C], v[:, :, :s + C], s)
                            for s in range(0, S, C)], dim=2)
        return dict(path="prefill_attention one call vs chunks", shape=f"S={S} chunk={C} H={H} Hkv={Hkv} D={D}",
                    fwd_err=rel(o2, o1), fast_ms=chunked, ref_ms=one,
                    bench="fast = chunked, ref = one call (same kernel); err = chunked vs one call")

    def check_torch_training(self, op, dtype):
        """The PyTorch chunked path forward + backward at train_T (what trains where no kernel's backward runs):
        time, and its float32-accumulated output vs the float64 chunked form on the same inputs."""
        T = self.s["train_T"]
        xs = (self.gdn_inputs if op == "gdn" else self.ssd_inputs)(T, dtype, True)
        fn = (lambda *a: chunked_gated_delta_rule(*a[:5], initial_state=a[5], use_qk_l2norm=True)) if op == "gdn" \
            else (lambda *a: chunked_ssd(*a[:5], initial_state=a[5]))

        def step():
            o, s = fn(*xs)
            torch.autograd.grad((o.float().square().mean() + s.mean()), xs)

        ms = bench(step, self.device, 3)
        with torch.no_grad():
            o, s = fn(*xs)
            ro, rs = fn(*[x.detach().double() for x in xs])
        return dict(path="torch chunked fwd+bwd", shape=f"T={T} {self.s[op]}", fwd_err=rel(o, ro),
                    state_err=rel(s, rs), fast_ms=ms, bench=f"fwd+bwd at T={T}")

    def main(self):
        """bf16 first (the dtype the benchmarks run; each dtype autotunes the kernels anew), then float32;
        within a dtype the attention checks (no autotuning) first."""
        T = self.s["check_T"]
        for dtype in (torch.bfloat16, torch.float32):
            self.run("mla_prefill", lambda dt: self.check_mla_prefill(dt, 0), dtype)
            self.run("mla_prefill_over_cache", lambda dt: self.check_mla_prefill(dt, self.s["mla_past"]), dtype)
            self.run("mla_decode", self.check_mla_decode, dtype)
            if dtype == torch.bfloat16:
                self.run("prefill_chunking_cost", self.check_chunked_prefill_cost, dtype)
            self.run("gdn_chunk", lambda dt: self.check_gdn(T, dt), dtype)
            self.run("gdn_recurrent", lambda dt: self.check_gdn(1, dt), dtype)
            self.run("ssd_chunk", lambda dt: self.check_ssd(T, dt), dtype)
            if dispatch.kernel_available("fla"):
                self.run("ssd_chunk_gla", lambda dt: self.check_ssd(T, dt, gla=True), dtype)
            self.run("ssd_recurrent", lambda dt: self.check_ssd(1, dt), dtype)
            if dtype == torch.bfloat16:
                self.run("gdn_torch_train", lambda dt: self.check_torch_training("gdn", dt), dtype)
                self.run("ssd_torch_train", lambda dt: self.check_torch_training("ssd", dt), dtype)
        self.save()
        print(open(self.out / "kernel_check.md").read())
        return 0


def _f(x):
    return "" if x is None else (f"{x:.2e}" if isinstance(x, float) and (x < 1e-2 or x > 1e4) else
                                 (f"{x:.3g}" if isinstance(x, float) else str(x)))


if __name__ == "__main__":
    if "--smoke" in sys.argv:
        torch.set_num_threads(1)  # tiny shapes: threads only contend
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    p.add_argument("--checks", default="", help="comma-separated check names to run (default: all)")
    sys.exit(Checker(p.parse_args()).main())
