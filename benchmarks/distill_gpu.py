"""Stage-2 distillation on one GPU: memory of the three KL implementations, and a full KD step.

(a) kl: peak memory and time of forward+backward of the KL between two models' next-token distributions,
    from final hidden states [T, 2048] and LM heads [128256, 2048] (bf16, gradients to the student's hidden
    states and head), at 8K and 32K tokens:
      plain    losses.kl_div on both full T x V logit tensors;
      chunked  losses.chunked_kl_div, 4096-token chunks recomputed in backward;
      hidden   losses.hidden_state_kl_div (backend torch), 4096 x 8192 tiles with its own backward.
    The three loss values are recorded too (they must agree).
(b) step: tokens/s and peak memory of one whole stage-2 optimizer step as the trainer runs it (kd.KDStudent
    and teacher_kd_targets: teacher forward without gradients, student forward + backward with activation
    checkpointing, grad clipping, AdamW step), bf16 autocast, batch 1, at 8K and 32K tokens, for
      hybrid   HyloConfig.from_preset("llama3.2-1b/4MLA12GDN") (random weights),
      llama    a plain Llama-3.2-1B-shaped LlamaForCausalLM (random weights, SDPA),
    against a Llama-3.1-8B-shaped teacher (hidden 4096, 32 layers, 32 / 8 heads, MLP 14336, vocab 128256,
    random bf16 weights). KL "chunked" at both lengths, and "full" (all logits, as the reference point of
    environment.md: 14.8K tokens/s, 46.7 GiB without an optimizer step) at 8K. Student weights and AdamW state
    in --student-dtype (bf16 by default; the trainer keeps float32 master weights: pass float32 for that).
Peak memory is torch.cuda.max_memory_allocated over the timed steps (weights, optimizer state, activations);
"extra" subtracts what was allocated before the step. Out-of-memory is caught per configuration and
recorded, as are other errors; configurations left when --budget-s runs out are recorded as skipped.
The hybrid's GDN layers use flash-linear-attention when it imports (kernel_backend auto), else the PyTorch
reference: the JSON says which.

    PYTHONPATH=. python benchmarks/distill_gpu.py --out benchmarks/results/distill_gpu     # H100, ~5-8 min
    PYTHONPATH=. python benchmarks/distill_gpu.py --out /tmp/distill_smoke --smoke        # tiny shapes, CPU
Writes OUT/distill_gpu.json and OUT/distill_gpu.md (rewritten after every configuration).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

FULL = dict(vocab=128256, hidden=2048, seq_lens=(8192, 32768), kl_chunk=4096, vocab_chunk=8192,
            teacher=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128),
            warmup=1, reps={8192: 3, 32768: 2})
SMOKE = dict(vocab=512, hidden=64, seq_lens=(64, 128), kl_chunk=48, vocab_chunk=100,
             teacher=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24),
             warmup=1, reps={64: 1, 128: 1})
GiB = 2**30


class Bench:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.shape = SMOKE if args.smoke else FULL
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.results = dict(env=self.env(), kl=[], step=[])

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def env(self) -> dict:
        import transformers

        from hylo_lab.ops.dispatch import kernel_available

        env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() and not self.smoke else "cpu",
                   smoke=self.smoke, fla=kernel_available("fla"), student_dtype=self.args.student_dtype,
                   kernel_backend=self.args.kernel_backend, checkpointing=not self.args.no_checkpointing,
                   tf32=torch.backends.cuda.matmul.allow_tf32,
                   started=time.strftime("%Y-%m-%d %H:%M:%S"))
        if torch.cuda.is_available() and not self.smoke:
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
        return env

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def clean(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def allocated(self) -> float | None:
        return torch.cuda.memory_allocated() / GiB if self.cuda else None

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else None

    def measure(self, row: dict, fn, reps: int):
        """Run fn warmup + reps times; fill row with status, ms per call and peak / extra memory."""
        if self.elapsed() > self.args.budget_s:
            row["status"] = f"skipped (time budget {self.args.budget_s:.0f} s used)"
            return None
        self.clean()
        before = self.allocated()
        out = None
        try:
            for _ in range(self.shape["warmup"]):
                out = fn()
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(reps):
                out = fn()
            self.sync()
            ms = (time.perf_counter() - start) / reps * 1000
            row.update(status="ok", ms=round(ms, 2))
            if self.cuda:
                row.update(peak_gib=round(self.peak(), 2), extra_gib=round(self.peak() - before, 2))
        except torch.cuda.OutOfMemoryError:
            row.update(status="OOM", peak_gib=None if not self.cuda else round(self.peak(), 2))
        except Exception as exc:  # noqa: BLE001 - recorded, the next configuration still runs
            row.update(status=f"error: {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        finally:
            self.clean()
        return out

    def save(self):
        self.results["env"]["seconds"] = round(self.elapsed(), 1)
        (self.out / "distill_gpu.json").write_text(json.dumps(self.results, indent=2))
        (self.out / "distill_gpu.md").write_text(markdown(self.results))

    # -- (a) the KL implementations ------------------------------------------------------------------------------

    def bench_kl(self):
        from hylo_lab.distill.losses import chunked_kl_div, hidden_state_kl_div, kl_div

        V, D, s = self.shape["vocab"], self.shape["hidden"], self.shape
        g = torch.Generator(device=self.device).manual_seed(0)
        dt = torch.bfloat16
        w_s = (0.02 * torch.randn(V, D, generator=g, device=self.device)).to(dt).requires_grad_()
        w_t = (0.02 * torch.randn(V, D, generator=g, device=self.device)).to(dt)
        impls = {
            "plain": lambda hs, ht: kl_div(hs @ w_s.T, ht @ w_t.T),
            "chunked": lambda hs, ht: chunked_kl_div(hs, ht, w_s, w_t, chunk_size=s["kl_chunk"]),
            "hidden": lambda hs, ht: hidden_state_kl_div(hs, ht, w_s, w_t, token_chunk=s["kl_chunk"],
                                                         vocab_chunk=s["vocab_chunk"], backend="torch"),
        }
        for T in s["seq_lens"]:
            hs = torch.randn(T, D, generator=g, device=self.device).to(dt).requires_grad_()
            ht = (hs.detach().float() + 0.5 * torch.randn(T, D, generator=g, device=self.device)).to(dt)
            for name, loss_fn in impls.items():
                row = dict(kl=name, tokens=T, vocab=V, hidden=D)
                print(f"[kl] {name} at {T} tokens ...", file=sys.stderr, flush=True)

                def step(loss_fn=loss_fn):
                    hs.grad = w_s.grad = None
                    loss = loss_fn(hs, ht)
                    loss.backward()
                    return loss.detach()

                loss = self.measure(row, step, s["reps"][T])
                if loss is not None:
                    row["loss"] = float(loss)
                hs.grad = w_s.grad = None
                self.results["kl"].append(row)
                self.save()
            del hs, ht

    # -- (b) a whole stage-2 step --------------------------------------------------------------------------------

    def build(self, make, dtype):
        """Construct a model directly on the device in `dtype` (no float32 copy of an 8B model first)."""
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(self.device):
                return make()
        finally:
            torch.set_default_dtype(previous)

    def teacher(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=self.shape["vocab"], max_position_embeddings=131072, rms_norm_eps=1e-5,
                          rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=8192),
                          tie_word_embeddings=False, attn_implementation="sdpa", **self.shape["teacher"])
        return self.build(lambda: LlamaForCausalLM(cfg), torch.bfloat16).eval().requires_grad_(False)

    def student(self, kind: str, dtype):
        from transformers import LlamaConfig, LlamaForCausalLM

        from hylo_lab import HyloConfig, HyloForCausalLM
        from hylo_lab.config import BASE_SHAPES

        if self.smoke:
            base = dict(vocab_size=self.shape["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
            hybrid = lambda: HyloConfig(**base, mixers=["gdn", "mla", "gdn", "gdn"], kv_lora_rank=16,  # noqa: E731
                                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, gdn_num_heads=2,
                                        gdn_head_dim=32, chunk_size=32, kernel_backend=self.args.kernel_backend)
        else:
            shape = BASE_SHAPES["llama3.2-1b"]
            base = {k: shape[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                          "tie_word_embeddings", "max_position_embeddings", "rope_parameters")}
            hybrid = lambda: HyloConfig.from_preset("llama3.2-1b/4MLA12GDN",  # noqa: E731
                                                    kernel_backend=self.args.kernel_backend)
        if kind == "hybrid":
            config = hybrid()
            model = self.build(lambda: HyloForCausalLM(config), dtype)
        else:
            config = LlamaConfig(**base, attn_implementation="sdpa")
            model = self.build(lambda: LlamaForCausalLM(config), dtype)
        model.train()
        if not self.args.no_checkpointing:
            from hylo_lab.distill.trainer import set_activation_checkpointing

            set_activation_checkpointing(model, True)
        return model

    def bench_step(self):
        from hylo_lab.distill.stages import StageSpec
        from hylo_lab.distill.kd import KDStudent, teacher_kd_targets

        s = self.shape
        short, long = s["seq_lens"]
        plan = [("hybrid", short, "chunked"), ("llama", short, "chunked"), ("hybrid", long, "chunked"),
                ("llama", long, "chunked"), ("hybrid", short, "full"), ("llama", short, "full")]
        dtype = getattr(torch, self.args.student_dtype)
        print("[step] building the teacher ...", file=sys.stderr, flush=True)
        teacher = self.teacher()
        teacher_gib = self.allocated()
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        for kind in ("hybrid", "llama"):
            if self.elapsed() > self.args.budget_s:
                for k, T, kl in plan:
                    if k == kind:
                        self.results["step"].append(dict(student=k, tokens=T, kl=kl, status="skipped (time budget)"))
                self.save()
                continue
            student = self.student(kind, dtype)
            params = sum(p.numel() for p in student.parameters())
            backend = None
            if kind == "hybrid":
                from hylo_lab.ops.dispatch import use_kernel

                probe = next(student.parameters())
                backend = "fla" if use_kernel("fla", student.config.kernel_backend, probe) else "torch reference"
            for k, T, kl in plan:
                if k != kind:
                    continue
                row = dict(student=kind, tokens=T, kl=kl, params_m=round(params / 1e6, 1), gdn_backend=backend,
                           teacher_gib=None if teacher_gib is None else round(teacher_gib, 2),
                           checkpointing=not self.args.no_checkpointing)
                print(f"[step] {kind} student, {T} tokens, kl {kl} ...", file=sys.stderr, flush=True)
                stage = StageSpec(name="bench", kind="kd", seq_len=T, steps=1, kl=kl, kl_chunk_size=s["kl_chunk"],
                                  vocab_chunk_size=s["vocab_chunk"])
                wrapper = KDStudent(student, stage)
                optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=self.cuda)
                ids = torch.randint(0, s["vocab"], (1, T), device=self.device,
                                    generator=torch.Generator(device=self.device).manual_seed(T))
                losses = []

                def step():
                    with autocast:
                        t_out, t_head = teacher_kd_targets(teacher, ids, kl)
                        loss, _ = wrapper(ids, t_out, t_head)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.detach())
                    return loss.detach()

                self.measure(row, step, s["reps"][T])
                if row.get("status") == "ok":
                    row["tokens_per_s"] = round(T / (row["ms"] / 1000), 1)
                    row["loss"] = float(losses[-1])
                optimizer.zero_grad(set_to_none=True)
                del optimizer, wrapper, ids, losses
                self.clean()
                self.results["step"].append(row)
                self.save()
            del student
            self.clean()
        del teacher
        self.clean()
        self.add_ratios()
        self.save()

    def add_ratios(self):
        """hybrid / llama tokens/s and peak memory at each (length, kl) where both ran (the issue's goals)."""
        rows = {(r["student"], r["tokens"], r["kl"]): r for r in self.results["step"]}
        ratios = []
        for (kind, T, kl), r in rows.items():
            other = rows.get(("llama", T, kl))
            if kind == "hybrid" and other and r.get("status") == other.get("status") == "ok":
                ratios.append(dict(tokens=T, kl=kl, speedup=round(r["tokens_per_s"] / other["tokens_per_s"], 3),
                                   peak_ratio=None if r.get("peak_gib") is None else
                                   round(r["peak_gib"] / other["peak_gib"], 3)))
        self.results["hybrid_vs_llama"] = ratios


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(res: dict) -> str:
    env = res["env"]
    lines = [f"# Stage-2 distillation benchmark ({env['device']})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, flash-linear-attention importable: "
             f"{env['fla']}, student dtype {env['student_dtype']}{', SMOKE (tiny shapes)' if env['smoke'] else ''}; "
             f"{env.get('seconds', '?')} s.", ""]
    if res["kl"]:
        lines += ["## (a) KL forward + backward, bf16 hidden states and heads", "",
                  "| kl | tokens | vocab | hidden | status | ms | peak GiB | extra GiB | loss |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for r in res["kl"]:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in
                                           ("kl", "tokens", "vocab", "hidden", "status", "ms", "peak_gib", "extra_gib",
                                            "loss")) + " |")
        lines.append("")
    if res["step"]:
        lines += ["## (b) One stage-2 step: 8B-shaped teacher forward, student forward + backward, AdamW", "",
                  "| student | tokens | kl | status | tokens/s | ms | peak GiB | extra GiB | params (M) | GDN backend |",
                  "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
        for r in res["step"]:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in
                                           ("student", "tokens", "kl", "status", "tokens_per_s", "ms", "peak_gib",
                                            "extra_gib", "params_m", "gdn_backend")) + " |")
        lines.append("")
    if res.get("hybrid_vs_llama"):
        lines += ["Hybrid vs Llama student (goals: tokens/s >= 1.0x at 8K and >= 1.5x at 32K, lower peak memory):", "",
                  "| tokens | kl | tokens/s ratio | peak memory ratio |", "|---:|---|---:|---:|"]
        for r in res["hybrid_vs_llama"]:
            lines.append(f"| {r['tokens']} | {r['kl']} | {_cell(r['speedup'])} | {_cell(r['peak_ratio'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for distill_gpu.json and distill_gpu.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument("--only", choices=("kl", "step"), help="run one part only")
    p.add_argument("--student-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="student weights and AdamW state (float32 = the trainer's master weights)")
    p.add_argument("--no-checkpointing", action="store_true", help="student without activation checkpointing")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "torch", "fla"),
                   help="the hybrid's GDN kernels: auto (fla when it imports), torch (reference), fla (forced)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no new configuration after this many seconds (default 420)")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # recover cleanly after an OOM
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke for a CPU check of the script")
    torch.manual_seed(0)
    bench = Bench(args)
    if args.only in (None, "kl"):
        bench.bench_kl()
    if args.only in (None, "step"):
        bench.bench_step()
    bench.save()
    print(markdown(bench.results))
    bad = [r for r in bench.results["kl"] + bench.results["step"] if str(r.get("status", "")).startswith("error")]
    if bad and args.smoke:
        sys.exit(f"{len(bad)} configuration(s) failed")
    return bench.results


if __name__ == "__main__":
    main()
