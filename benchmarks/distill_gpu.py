"""Training speed on one GPU: the losses alone, student forward+backward, and a whole KD step (issue 18).

(a) losses: forward+backward of the next-token losses from final hidden states [T, 2048] and LM heads
    [128256, 2048] (bf16; gradients to the student's hidden states and head), each against the plain
    float32-logit form on the same inputs (loss and hidden-state gradient error recorded):
      KL   plain (losses.kl_div on full logits), chunked (losses.fused_linear_kd: one pass, gradients in
           forward), hidden (losses.hidden_state_kl_div: vocabulary tiles), liger (Liger-Kernel's
           LigerFusedLinearJSD with beta 0, where importable; which KL direction it computes is recorded);
      CE   plain (F.cross_entropy on full logits), fused (losses.fused_linear_cross_entropy), liger
           (LigerFusedLinearCrossEntropyLoss, where importable).
(b) student: forward + backward (LM loss by fused_linear_cross_entropy, activation checkpointing, bf16
    autocast, batch 1, no optimizer) of 4MLA12GDN, 4MLA12M2 and a Llama-3.2-1B-shaped Llama (SDPA), random
    weights, at 8K, 32K and 64K tokens; the path each linear op's backward takes (ops/dispatch.py) recorded.
(c) step: one whole stage-2 optimizer step as the trainer runs it (kd.KDStudent + teacher_kd_targets:
    teacher forward without autograd, student forward + backward, clip, fused AdamW) against a
    Llama-3.1-8B-shaped teacher, every KL variant ("chunked" = the recipes' default, "hidden", "full"), and
    kl="topk" (k = 64) twice: "topk" runs the teacher forward and takes its top-k each step (an epoch's first
    pass), "topk-cache" reads them from a teacher_cache file written before timing (every later epoch; the
    file's MiB recorded): the pair shows what the cache saves per step.
(d) profile: the top CUDA kernels and launch counts of one student step at 8K (each hybrid and Llama).
Configurations run in priority order and each is written to OUT/distill_gpu.{json,md} as soon as it is
measured; out-of-memory and errors are recorded per configuration; none starts after --budget-s.

    PYTHONPATH=. python benchmarks/distill_gpu.py --out benchmarks/results        # H100
    PYTHONPATH=. python benchmarks/distill_gpu.py --out /tmp/distill_smoke --smoke  # tiny shapes, CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

FULL = dict(vocab=128256, hidden=2048, seq_lens=(8192, 32768, 65536), kl_chunk=4096, vocab_chunk=8192,
            teacher=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128),
            warmup=1, reps={8192: 3, 32768: 2, 65536: 1})
SMOKE = dict(vocab=512, hidden=64, seq_lens=(64, 128, 192), kl_chunk=48, vocab_chunk=100,
             teacher=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=24),
             warmup=1, reps={64: 1, 128: 1, 192: 1})
GiB = 2**30
STUDENTS = ("gdn", "m2", "llama")


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class Bench:
    def __init__(self, args):
        self.args, self.smoke = args, args.smoke
        self.shape = SMOKE if args.smoke else FULL
        self.device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.results = dict(env=self.env(), losses=[], student=[], step=[], profiles={})
        self.note("environment recorded (fla backward probes included)")
        self.models, self._teacher = {}, None

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def env(self) -> dict:
        import importlib.metadata as md

        import transformers

        from hylo_lab.ops import dispatch

        def version(pkg):
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return None

        env = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                   device=torch.cuda.get_device_name() if self.cuda else "cpu", smoke=self.smoke,
                   packages={p: version(p) for p in ("triton", "flash-linear-attention", "fla-core", "tilelang",
                                                      "mamba-ssm", "liger-kernel")},
                   tilelang_imports=dispatch.module_imports("tilelang"), fla=dispatch.kernel_available("fla"),
                   mamba_ssm=dispatch.kernel_available("mamba_ssm"), kernel_backend=self.args.kernel_backend,
                   checkpointing=not self.args.no_checkpointing, label=self.args.label,
                   started=time.strftime("%Y-%m-%d %H:%M:%S"))
        if self.cuda:
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GiB, 1)
            env["backward"] = {op: dispatch.backward_decision(op, "cuda") or "fla kernel"
                               for op in dispatch.FLA_CHUNK_OPS} if env["fla"] else "no fla"
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
            self.note(f"warming up {row} (first calls compile and autotune kernels)")
            for _ in range(self.shape["warmup"]):
                out = fn()
            self.sync()
            self.note("warm")
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
        self.add_ratios()
        for name, text in (("distill_gpu.json", json.dumps(self.results, indent=2)),
                           ("distill_gpu.md", markdown(self.results))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def note(self, text):
        """A progress line on stderr with the seconds since start: where a run's time went, also when it is cut."""
        print(f"[+{self.elapsed():.0f}s] {text}", file=sys.stderr, flush=True)

    def log(self, part, row):
        print(f"[{part}] " + json.dumps(row), file=sys.stderr, flush=True)
        self.results[part].append(row)
        self.save()

    # -- (a) the losses ------------------------------------------------------------------------------------------

    def loss_impls(self):
        import torch.nn.functional as F

        from hylo_lab.distill.losses import fused_linear_cross_entropy, fused_linear_kd, hidden_state_kl_div, kl_div

        s = self.shape
        kl = {"plain": lambda hs, ht, ws, wt, y: kl_div(hs @ ws.T, ht @ wt.T),
              "chunked": lambda hs, ht, ws, wt, y: fused_linear_kd(hs, ws, ht, wt, chunk_size=s["kl_chunk"])[0],
              "hidden": lambda hs, ht, ws, wt, y: hidden_state_kl_div(hs, ht, ws, wt, token_chunk=s["kl_chunk"],
                                                                      vocab_chunk=s["vocab_chunk"], backend="torch")}
        ce = {"plain": lambda hs, ht, ws, wt, y: F.cross_entropy((hs @ ws.T).float(), y),
              "fused": lambda hs, ht, ws, wt, y: fused_linear_cross_entropy(hs, ws, y, chunk_size=s["kl_chunk"])}
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

            jsd, flce = LigerFusedLinearJSD(jsd_beta=0.0), LigerFusedLinearCrossEntropyLoss()
            kl["liger"] = lambda hs, ht, ws, wt, y: jsd(hs, ws, ht, wt, None)
            ce["liger"] = lambda hs, ht, ws, wt, y: flce(ws, hs, y)
        except Exception as exc:  # noqa: BLE001 - not installed, or no triton
            self.results["env"]["liger"] = f"not importable: {type(exc).__name__}: {str(exc)[:120]}"
        return kl, ce

    def bench_losses(self, T):
        from hylo_lab.distill.losses import kl_div

        V, D, s = self.shape["vocab"], self.shape["hidden"], self.shape
        g = torch.Generator(device=self.device).manual_seed(0)
        dt = torch.bfloat16
        ws = (0.02 * torch.randn(V, D, generator=g, device=self.device)).to(dt).requires_grad_()
        wt = (0.02 * torch.randn(V, D, generator=g, device=self.device)).to(dt)
        hs = torch.randn(T, D, generator=g, device=self.device).to(dt).requires_grad_()
        ht = (hs.detach().float() + 0.5 * torch.randn(T, D, generator=g, device=self.device)).to(dt)
        y = torch.randint(0, V, (T,), generator=g, device=self.device)
        kl, ce = self.loss_impls()
        with torch.no_grad():  # which direction liger's beta = 0 computes
            zs, zt = (hs.float() @ ws.float().T), (ht.float() @ wt.float().T)
            ref_dir = {d: float(kl_div(zs, zt, direction=d)) for d in ("forward", "reverse")}
            del zs, zt
        for kind, impls in (("kl", kl), ("ce", ce)):
            ref = None
            for name, fn in impls.items():
                row = dict(loss=kind, impl=name, tokens=T, vocab=V, hidden=D)

                def step(fn=fn):
                    hs.grad = ws.grad = None
                    loss = fn(hs, ht, ws, wt, y)
                    loss.backward()
                    return loss.detach()

                loss = self.measure(row, step, s["reps"].get(T, 1))
                if loss is not None:
                    row["loss"] = float(loss)
                    grads = (hs.grad.float().clone(), ws.grad.float().clone())
                    if name == "plain":
                        ref = (float(loss), grads)
                    elif ref is not None:
                        row.update(loss_err=abs(row["loss"] - ref[0]) / max(abs(ref[0]), 1e-30),
                                   grad_h_err=rel(grads[0], ref[1][0]), grad_w_err=rel(grads[1], ref[1][1]))
                    if kind == "kl" and name == "liger":
                        row["liger_direction"] = min(ref_dir, key=lambda d: abs(ref_dir[d] - row["loss"]))
                    del grads
                hs.grad = ws.grad = None
                self.log("losses", row)

    # -- models --------------------------------------------------------------------------------------------------

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
        if self._teacher is None:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(vocab_size=self.shape["vocab"], max_position_embeddings=131072, rms_norm_eps=1e-5,
                              rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                   low_freq_factor=1.0, high_freq_factor=4.0,
                                                   original_max_position_embeddings=8192),
                              tie_word_embeddings=False, attn_implementation="sdpa", **self.shape["teacher"])
            self._teacher = self.build(lambda: LlamaForCausalLM(cfg), torch.bfloat16).eval().requires_grad_(False)
        return self._teacher

    def student(self, kind: str):
        if kind in self.models:
            return self.models[kind]
        from transformers import LlamaConfig, LlamaForCausalLM

        from hylo_lab import HyloConfig, HyloForCausalLM
        from hylo_lab.config import BASE_SHAPES

        if self.smoke:
            base = dict(vocab_size=self.shape["vocab"], hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
            linear = {"gdn": "gdn", "m2": "mamba2"}.get(kind)
            hybrid = lambda: HyloConfig(**base, mixers=[linear, "mla", linear, linear], kv_lora_rank=16,  # noqa: E731
                                        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, gdn_num_heads=2,
                                        gdn_head_dim=32, chunk_size=32, kernel_backend=self.args.kernel_backend)
        else:
            shape = BASE_SHAPES["llama3.2-1b"]
            base = {k: shape[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                                          "tie_word_embeddings", "max_position_embeddings", "rope_parameters")}
            preset = {"gdn": "llama3.2-1b/4MLA12GDN", "m2": "llama3.2-1b/4MLA12M2"}.get(kind)
            hybrid = lambda: HyloConfig.from_preset(preset, kernel_backend=self.args.kernel_backend)  # noqa: E731
        dtype = getattr(torch, self.args.student_dtype)
        if kind == "llama":
            config = LlamaConfig(**base, attn_implementation="sdpa")
            model = self.build(lambda: LlamaForCausalLM(config), dtype)
        else:
            config = hybrid()
            model = self.build(lambda: HyloForCausalLM(config), dtype)
        model.train()
        if not self.args.no_checkpointing:
            from hylo_lab.distill.trainer import set_activation_checkpointing

            set_activation_checkpointing(model, True)
        self.models[kind] = model
        return model

    def backend(self, kind: str) -> str:
        """The path the linear op's backward takes in this student (ops/dispatch.py, under its kernel_backend)."""
        if kind == "llama" or not self.cuda:
            return "sdpa" if kind == "llama" else "torch chunked"
        from hylo_lab.ops import dispatch

        b = self.args.kernel_backend
        p = torch.zeros(1, device=self.device, requires_grad=True)
        if kind == "gdn":
            return "fla" if dispatch.use_fla_chunk("gated_delta", b, p) else "torch chunked"
        if dispatch.use_kernel("mamba_ssm", b, p):
            return "mamba_ssm"
        op = dispatch.fla_chunk_choice(("simple_gla", "gla"), b, p)
        return f"fla {op}" if op else "torch chunked"

    # -- (b) student forward + backward --------------------------------------------------------------------------

    def bench_student(self, kind, T):
        from hylo_lab.distill.losses import fused_linear_cross_entropy

        row = dict(student=kind, tokens=T)
        try:
            model = self.student(kind)
            row.update(params_m=round(sum(p.numel() for p in model.parameters()) / 1e6, 1), backend=self.backend(kind))
        except Exception as exc:  # noqa: BLE001
            row["status"] = f"error building: {type(exc).__name__}: {str(exc)[:200]}"
            return self.log("student", row)
        ids = torch.randint(0, self.shape["vocab"], (1, T), device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(T))
        labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            loss = fused_linear_cross_entropy(hidden, model.lm_head.weight, labels, chunk_size=self.shape["kl_chunk"])
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss.detach()

        loss = self.measure(row, step, self.shape["reps"][T])
        if row.get("status") == "ok":
            row.update(tokens_per_s=round(T / (row["ms"] / 1000), 1), loss=float(loss))
        self.log("student", row)

    # -- (c) a whole stage-2 step --------------------------------------------------------------------------------

    def bench_step(self, kind, T, kl):
        from hylo_lab.distill.kd import KDStudent
        from hylo_lab.distill.stages import StageSpec

        s = self.shape
        row = dict(student=kind, tokens=T, kl=kl)
        if self.elapsed() > self.args.budget_s:
            row["status"] = "skipped (time budget)"
            return self.log("step", row)
        try:
            teacher = self.teacher()
            student = self.student(kind)
            row.update(backend=self.backend(kind), teacher_gib=None if not self.cuda else round(
                sum(p.numel() * p.element_size() for p in teacher.parameters()) / GiB, 2))
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM building"
            return self.log("step", row)
        stage = StageSpec(name="bench", kind="kd", seq_len=T, steps=1, kl="topk" if kl.startswith("topk") else kl,
                          kl_chunk_size=s["kl_chunk"], vocab_chunk_size=s["vocab_chunk"])
        wrapper = KDStudent(student, stage)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=self.cuda)
        ids = torch.randint(0, s["vocab"], (1, T), device=self.device,
                            generator=torch.Generator(device=self.device).manual_seed(T))

        targets, cache_dir = self.step_targets(teacher, ids, kl, stage, row)

        def step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                t_out, t_head = targets()
                loss, _ = wrapper(ids, t_out, t_head)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        loss = self.measure(row, step, s["reps"][T])
        if row.get("status") == "ok":
            row.update(tokens_per_s=round(T / (row["ms"] / 1000), 1), loss=float(loss))
        optimizer.zero_grad(set_to_none=True)
        del optimizer, wrapper
        if cache_dir is not None:
            shutil.rmtree(cache_dir, ignore_errors=True)
        self.clean()
        self.log("step", row)

    def step_targets(self, teacher, ids, kl, stage, row):
        """(the teacher side of a step, the cache folder to remove or None): teacher_kd_targets; for "topk" the
        teacher forward and its top-k; for "topk-cache" a read of the file written here once before timing."""
        from hylo_lab.distill.kd import teacher_kd_targets
        from hylo_lab.distill.teacher_cache import TeacherTopKCache, teacher_topk_targets

        def topk():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return teacher_topk_targets(teacher, ids, stage.teacher_topk, stage.temperature, stage.kl_chunk_size)

        if kl.startswith("topk"):
            row["k"] = stage.teacher_topk
        if kl == "topk":
            return lambda: (topk(), None), None
        if kl != "topk-cache":
            return lambda: teacher_kd_targets(teacher, ids, kl), None
        folder = tempfile.mkdtemp(prefix=".topk-cache-", dir=self.out)
        cache = TeacherTopKCache(folder, "bench", stage.teacher_topk, stage.temperature)
        row["cache_mib"] = round(cache.store(ids, *topk()).stat().st_size / 2**20, 2)

        def read():
            found = cache.load(ids)
            if found is None:
                raise RuntimeError("the top-k cache file did not read back")
            return found, None

        return read, folder

    # -- (d) where the time goes ---------------------------------------------------------------------------------

    def profile(self, kind, T):
        from torch.profiler import ProfilerActivity, profile

        from hylo_lab.distill.losses import fused_linear_cross_entropy

        if self.elapsed() > self.args.budget_s:
            return
        model = self.student(kind)
        ids = torch.randint(0, self.shape["vocab"], (1, T), device=self.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        try:
            with profile(activities=acts) as prof:
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
                fused_linear_cross_entropy(hidden, model.lm_head.weight, ids).backward()
                model.zero_grad(set_to_none=True)
                self.sync()
            attr = "device_time_total" if self.cuda else "cpu_time_total"
            ev = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)
            self.results["profiles"][kind] = dict(
                student=kind, tokens=T, backend=self.backend(kind),
                top=[dict(name=e.key[:90], calls=e.count, ms=round(getattr(e, attr, 0) / 1000, 2)) for e in ev[:20]],
                launches=sum(e.count for e in prof.events() if getattr(e, "device_type", None) is not None
                             and str(e.device_type).endswith("CUDA")))
        except Exception as exc:  # noqa: BLE001
            self.results["profiles"][kind] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
        self.save()

    def add_ratios(self):
        """hybrid / llama tokens/s and peak memory wherever both ran (the issue's goals)."""
        ratios = []
        for part, key in (("student", lambda r: (r["tokens"],)), ("step", lambda r: (r["tokens"], r["kl"]))):
            rows = {(r["student"], *key(r)): r for r in self.results[part] if r.get("status") == "ok"}
            for (kind, *k), r in rows.items():
                other = rows.get(("llama", *k))
                if kind != "llama" and other:
                    ratios.append(dict(part=part, student=kind, tokens=k[0], kl=k[1] if len(k) > 1 else None,
                                       speedup=round(r["tokens_per_s"] / other["tokens_per_s"], 3),
                                       peak_ratio=None if r.get("peak_gib") is None else
                                       round(r["peak_gib"] / other["peak_gib"], 3)))
        self.results["hybrid_vs_llama"] = ratios

    def plan(self):
        """Priority order: what answers the issue's goals first, the longest lengths last."""
        short, mid, long = self.shape["seq_lens"]
        only = self.args.only
        jobs = []
        if only in (None, "losses"):
            jobs.append(lambda: self.bench_losses(short))
        if only in (None, "student"):
            jobs += [lambda k=k: self.bench_student(k, short) for k in STUDENTS]
        if only in (None, "step"):
            jobs += [lambda k=k: self.bench_step(k, short, "chunked") for k in STUDENTS]
        if only in (None, "student"):
            jobs += [lambda k=k: self.bench_student(k, mid) for k in STUDENTS]
        if only in (None, "step"):
            jobs += [lambda k=k, kl=kl: self.bench_step(k, short, kl) for kl in ("full", "hidden") for k in ("gdn", "llama")]
            jobs += [lambda kl=kl: self.bench_step("gdn", short, kl) for kl in ("topk", "topk-cache")]
        if only in (None, "student"):
            jobs += [lambda k=k: self.profile(k, short) for k in STUDENTS]
            jobs += [lambda k=k: self.bench_student(k, long) for k in STUDENTS]
        if only in (None, "step"):
            jobs += [lambda k=k: self.bench_step(k, mid, "chunked") for k in ("gdn", "llama")]
        return jobs


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _table(rows, cols):
    out = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(_cell(r.get(k)) for _, k in cols) + " |" for r in rows]
    return out + [""]


def markdown(res: dict) -> str:
    env = res["env"]
    pk = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines = [f"# Training speed: losses, student forward+backward, KD step ({env['device']})", "",
             f"{env.get('label') or ''} torch {env['torch']}, transformers {env['transformers']}; {pk}; tilelang "
             f"imports: {env['tilelang_imports']}; fla backward per op: {env.get('backward')}; "
             f"{'SMOKE (tiny shapes); ' if env['smoke'] else ''}{env.get('seconds', '?')} s.", ""]
    if res["losses"]:
        lines += ["## (a) Losses from hidden states, forward + backward (bf16 in, errors vs plain)", ""]
        lines += _table(res["losses"], [("loss", "loss"), ("impl", "impl"), ("tokens", "tokens"),
                                        ("status", "status"), ("ms", "ms"), ("peak GiB", "peak_gib"),
                                        ("extra GiB", "extra_gib"), ("value", "loss"), ("value err", "loss_err"),
                                        ("grad h err", "grad_h_err"), ("grad W err", "grad_w_err"),
                                        ("liger KL is", "liger_direction")])
    if res["student"]:
        lines += ["## (b) Student forward + backward (fused CE, activation checkpointing, bf16, batch 1)", ""]
        lines += _table(res["student"], [("student", "student"), ("tokens", "tokens"), ("status", "status"),
                                         ("tokens/s", "tokens_per_s"), ("ms", "ms"), ("peak GiB", "peak_gib"),
                                         ("params (M)", "params_m"), ("linear backward", "backend")])
    if res["step"]:
        lines += ["## (c) One stage-2 step: 8B-shaped teacher forward, student forward + backward, AdamW", ""]
        lines += _table(res["step"], [("student", "student"), ("tokens", "tokens"), ("kl", "kl"),
                                      ("status", "status"), ("tokens/s", "tokens_per_s"), ("ms", "ms"),
                                      ("peak GiB", "peak_gib"), ("extra GiB", "extra_gib"),
                                      ("linear backward", "backend"), ("top-k", "k"), ("cache MiB", "cache_mib")])
    if res.get("hybrid_vs_llama"):
        lines += ["Hybrid / Llama student (goals: fwd+bwd >= 1.0x at 8K, 1.4x at 32K, 1.8x at 64K; KD step >= 1.0x "
                  "at 8K):", ""]
        lines += _table(res["hybrid_vs_llama"], [("part", "part"), ("student", "student"), ("tokens", "tokens"),
                                                 ("kl", "kl"), ("tokens/s ratio", "speedup"),
                                                 ("peak memory ratio", "peak_ratio")])
    for prof in res.get("profiles", {}).values():
        if prof.get("top"):
            lines += ["", f"## (d) Profile: {prof['student']} student fwd+bwd at {prof['tokens']} tokens "
                      f"({prof['backend']}), {prof['launches']} kernel launches", ""]
            lines += _table(prof["top"], [("op", "name"), ("calls", "calls"), ("ms", "ms")])
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for distill_gpu.json and distill_gpu.md")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: checks the script, measures nothing")
    p.add_argument("--only", choices=("losses", "student", "step"), help="run one part only")
    p.add_argument("--label", default="", help="a note on the software stack, written into the results")
    p.add_argument("--student-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="student weights and AdamW state (float32 = the trainer's master weights)")
    p.add_argument("--no-checkpointing", action="store_true", help="student without activation checkpointing")
    p.add_argument("--kernel-backend", default="auto", choices=("auto", "torch", "fla"),
                   help="the hybrids' linear-op kernels: auto (dispatch decides per op), torch, fla (forced)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="start no new configuration after this many seconds (default 420)")
    args = p.parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # recover cleanly after an OOM
    if not args.smoke and not torch.cuda.is_available():
        print("distill_gpu: no CUDA device here; run with --smoke for a CPU check of the script", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    bench = Bench(args)
    for job in bench.plan():
        if bench.elapsed() > args.budget_s:
            break
        job()
    bench.save()
    print(markdown(bench.results))
    bad = [r for r in bench.results["losses"] + bench.results["student"] + bench.results["step"]
           if str(r.get("status", "")).startswith("error")]
    if bad and args.smoke:
        print(f"distill_gpu: {len(bad)} configuration(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
