"""The distillation loop: a recipe (stages.py) -> stage 1 Enhanced-ILD -> assembly -> stage-2 KD stages.

`run_recipe(recipe)` does, in order, and checks everything it can before loading any weights:
  1. validate the recipe; load the tokenizer; check the teacher shares it (vocabulary, specials);
     resolve the student layout; pack one row per stage and the held-out rows (data can fill seq_len)
  2. stage 1 (ild stages): upcycle the all-MLA and the all-linear students from the base, train each
     with teacher forcing (ild.py), then assemble the hybrid by the layout. Without ild stages: upcycle
     the hybrid directly (or load `student.init`).
  3. each kd stage: load the previous stage's result, apply the stage's YaRN to the MLA layers, distil
     against the teacher (forward KL by default; full, chunked or logit-free hidden-state KL).
Every training run (one student in one stage) is the same visible loop (`Distiller.train_run`):
    lr = warmup_cosine(step) (schedule.py); for each micro-batch: teacher targets (no grad) -> student loss
    (losses.py, through ild.py / kd.py) -> backward (accumulated); non-finite loss -> stop; clip; optimizer
    step; log; evaluate (evaluation.py); checkpoint (checkpoints.py).
Outputs, under output_dir (checkpoints.py): recipe.yaml, <stage>/[<student>/]{checkpoints,best,final}/,
summary.json. `resume=True` skips finished runs and continues an interrupted one from its newest readable
checkpoint: model, optimizer, data position, RNG and step, so the result equals an uninterrupted run's; a
recipe that differs from the recorded one in anything that shapes the weights is refused unless
`allow_recipe_change` (preflight.py). A held-out KL far above the best so far is reported as divergence and
the best weights are kept in <run>/best/ (evaluation.py).

Batches: `batch_size` rows per optimizer step for all processes together, `micro_batch_size` rows per
forward per process, gradient accumulation = batch_size / (micro_batch_size x processes). Every process
packs the same global batch and takes its own rows, so 1 or N GPUs see the same data in the same order.
Multi-GPU: `accelerate launch [--multi_gpu | --use_fsdp --fsdp_version 2] -m hylo_lab.cli distill RECIPE.yaml`
(FSDP2 and checkpoints that reshard: distributed.py; the teacher is replicated there, not sharded).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..data.packing import PackedStream
from ..errors import UserError
from ..outputs import check_writable
from ..schedule import warmup_cosine
from .checkpoints import (latest_checkpoint, list_checkpoints, lock_holder, record_recipe,
                          refuse_locked, restore, run_lock, save_checkpoint, save_model, save_student, write_atomic)
from .distributed import make_accelerator
from .evaluation import best_so_far, diverged_at_end, heldout_metrics, is_diverging, kl_name, train_metrics
from .ild import TeacherForcedStudent, teacher_states
from .kd import KDStudent, apply_yarn, check_shared_tokenizer, teacher_kd_targets
from .preflight import check_data, check_recipe_matches, make_tracker, plan_student, student_kinds
from .runs import NonFiniteLoss, Run, RunResult, adamw, batch_layout, finished_result, run_seed, \
    set_activation_checkpointing
from .stages import Recipe, RecipeError, StageSpec, expand, load_recipe, recipe_from_dict
from .teacher_cache import TeacherTopKCache, check_topk, teacher_fingerprint, teacher_topk_targets


class Distiller:
    """Holds what every training run of one recipe shares: accelerator, tokenizer, data, tracker, budget."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, max_steps: int | None = None, tracker=None,
                 allow_recipe_change: bool = False, overall: bool = False):
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise UserError(f"max_steps={max_steps!r}: give a whole number of optimizer steps >= 1")
        self.recipe, self.resume, self.tracker = recipe, resume, tracker
        self.allow_recipe_change = allow_recipe_change
        self.changes: dict[str, tuple] = {}
        self.out = Path(expand(recipe.output_dir))
        self.budget = max_steps  # optimizer steps left in this invocation (None = unlimited)
        self.t = recipe.train
        self.accelerator = None
        self.world = None
        self.tokenizer = None
        self.heldout: dict[int, torch.Tensor] = {}
        self.train_sources = None
        self.teachers: dict[str, nn.Module] = {}
        self.topk_caches: dict[str, TeacherTopKCache] = {}  # kl=topk stages with a teacher_cache, by stage name
        self.results: dict[str, RunResult] = {}
        self.show_overall = overall
        self.overall = None  # progress.Overall over the runs still to train, when shown

    # -- setup ---------------------------------------------------------------------------------------------------

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def log(self, msg: str):
        if self.accelerator is None or self.main:
            print(f"[distill] {msg}", file=sys.stderr, flush=True)

    def setup(self):
        """Everything cheap that can fail: runs before any model weight is loaded."""
        r, t = self.recipe, self.t
        if t.device == "cuda" and not torch.cuda.is_available():
            raise RecipeError("train.device=cuda but no CUDA device is visible")
        cpu = t.device == "cpu" or (t.device == "auto" and not torch.cuda.is_available())
        self.accelerator = make_accelerator(cpu=cpu, bf16=t.precision == "bf16" or (t.precision == "auto" and not cpu))
        self.device = self.accelerator.device
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        if self.bf16 and self.device.type == "cpu" and t.precision == "bf16":
            self.log("precision bf16 on CPU: autocast to bfloat16 (slow; fp32 is the CPU default)")
        teacher_dtype = t.teacher_dtype if t.teacher_dtype != "auto" else (
            "bfloat16" if self.device.type == "cuda" else "float32")
        self.teacher_dtype = getattr(torch, teacher_dtype)
        self.log(f"{self.accelerator.num_processes} process(es) on {self.device.type} "
                 f"({self.accelerator.distributed_type}), {'bf16 autocast' if self.bf16 else 'float32'}, "
                 f"teacher in {teacher_dtype}")

        check_writable(self.out, "output_dir")
        if self.out.exists() and any(self.out.iterdir()) and not self.resume:
            raise RecipeError(f"output_dir {str(self.out)!r} already holds a run: pass --resume to continue it, or "
                              f"choose another output_dir")
        if self.resume and not self.out.exists():
            self.log(f"--resume: {self.out} does not exist yet, starting a new run")
        holder = lock_holder(self.out) if self.main else None  # other ranks would see their own main's lock
        if holder is not None:
            refuse_locked(self.out, holder)
        if self.resume:
            self.changes = check_recipe_matches(self.out, self.recipe, allow=self.allow_recipe_change, log=self.log)
        if r.uses_toy():
            from ..data.toy import get_toy_world

            names = tuple(dict.fromkeys(n[4:] for n in (r.base, r.teacher, r.tokenizer)
                                        if isinstance(n, str) and n.startswith("toy:")))
            self.log(f"toy world (teachers {', '.join(names) or 'none'}): building or reusing the cache")
            self.world = get_toy_world(r.toy_world.root, teachers=names, quick=r.toy_world.quick,
                                       seed=r.toy_world.seed, progress=t.progress and self.main,
                                       training=r.toy_world.training, digit_group=r.toy_world.digit_group)
        self.base_path = self.resolve(r.base)
        self.teacher_path = self.resolve(r.teacher_name)
        from transformers import AutoTokenizer

        tok_path = self.resolve(r.tokenizer) if r.tokenizer else self.base_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except Exception as exc:  # noqa: BLE001 - one clear message
            raise RecipeError(f"cannot load the tokenizer from {tok_path!r}: {exc}") from exc
        check_shared_tokenizer(self.base_path, self.teacher_path, self.tokenizer)
        if any(st.kind == "kd" and st.kl == "topk" for st in r.stages):
            from transformers import AutoConfig

            check_topk(r.stages, AutoConfig.from_pretrained(self.teacher_path).vocab_size)
        self.mixers, self.dims, self.k_smart = plan_student(r, self.base_path)
        self.train_sources, self.heldout = check_data(r, self.tokenizer, self.world, t.eval_rows)

    def resolve(self, ref: str) -> str:
        if ref.startswith("toy:"):
            return str(self.world.teacher_dirs[ref[4:]])
        p = Path(expand(ref))
        return str(p) if p.exists() else ref

    # -- models --------------------------------------------------------------------------------------------------

    def teacher(self, path: str):
        if path not in self.teachers:
            from transformers import AutoModelForCausalLM

            self.log(f"loading teacher {path} ({self.teacher_dtype})")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=self.teacher_dtype)
            model.eval().requires_grad_(False).to(self.device)
            self.teachers[path] = model
        return self.teachers[path]

    def load_hylo(self, path: Path):
        from ..model import HyloForCausalLM

        return HyloForCausalLM.from_pretrained(str(path), dtype=torch.float32)

    def upcycle_kwargs(self) -> dict:
        s = self.recipe.student
        return dict(self.dims, **s.upcycle, dtype=torch.float32, seed=self.recipe.seed)

    def calibration_ids(self):
        st = self.recipe.stages[0]
        stream = PackedStream(self.recipe.data.train, self.tokenizer, min(st.seq_len, 512),
                              seed=run_seed(self.recipe.seed, "calibration"), sources=self.train_sources)
        return stream.next_batch(self.recipe.student.calibration_rows)

    # -- the whole recipe ----------------------------------------------------------------------------------------

    def run(self) -> dict:
        if self.accelerator is None:
            self.setup()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if self.show_overall and self.main:
            from ..progress import Overall

            self.overall = Overall("distill", self.runs_to_train(), relative=True,
                                   echo=lambda line: print(line, file=sys.stderr, flush=True))
        with run_lock(self.out, self.log) if self.main else contextlib.nullcontext():
            summary = self._run()
        if self.overall is not None and not summary["stopped_early"]:
            self.overall.done()
        return summary

    def runs_to_train(self) -> dict[str, int]:
        """{run: tokens} of each training run not finished yet, in order (the overall line's relative costs)."""
        r, runs = self.recipe, {}
        ild = [st for st in r.stages if st.kind == "ild"]
        if ild and not (self.out / "assembled" / "final" / "done.json").is_file():
            runs.update({f"{st.name}/{kind}": st for kind in self.student_kinds() for st in ild})
        runs.update({st.name: st for st in r.stages if st.kind == "kd"})
        batch = {name: r.stage_batch(st)[0] for name, st in runs.items()}
        return {name: st.num_steps(batch[name]) * batch[name] * st.seq_len for name, st in runs.items()
                if not (self.out / name / "final" / "done.json").is_file()}

    def _run(self) -> dict:
        r = self.recipe
        if self.main:
            record_recipe(self.out, r.to_dict(), self.changes)
        self.accelerator.wait_for_everyone()
        ild = [st for st in r.stages if st.kind == "ild"]
        kd = [st for st in r.stages if st.kind == "kd"]
        current = None
        if ild:
            current = self.run_ild(ild)
            if self.teacher_path != self.base_path:  # the base taught stage 1 only
                self.teachers.pop(self.base_path, None)
        elif r.student.init is not None:
            current = Path(expand(r.student.init))
        else:
            current = self.initial_hybrid()
        stopped = current is None
        for st in kd:
            if stopped:
                break
            res = self.run_kd(st, current)
            stopped = res.stopped
            current = res.final_dir
        summary = dict(final_model=None if stopped else str(current), stopped_early=stopped, output_dir=str(self.out),
                       runs={k: dict(steps=v.steps, final=str(v.final_dir) if v.final_dir else None,
                                     eval_kl=v.eval_kl, **({"diverged": v.diverged} if v.diverged else {}))
                             for k, v in self.results.items()})
        if self.main:
            write_atomic(self.out / "summary.json", json.dumps(summary, indent=2))
        if self.tracker is not None and self.main:
            self.tracker.log_artifact(self.out / "recipe.yaml", "recipe")
            self.tracker.log_artifact(self.out / "summary.json", "tables")
            if not stopped:
                self.tracker.set_tags({"final_model": str(current)})
                self.tracker.log_dict(dict(final_model=str(current)), "final_model.json", "model")
                size = sum(f.stat().st_size for f in Path(current).rglob("*") if f.is_file()) / 2**20
                if size <= r.tracking.log_model_max_mb:
                    self.tracker.log_artifact(current, "model")
        self.log("stopped at the step budget (--max-steps); continue with --resume" if stopped
                 else f"done: final model {current}")
        return summary

    def initial_hybrid(self) -> Path:
        """Upcycle the hybrid straight from the base (no stage 1), saved so a resume reloads the same weights."""
        from ..upcycle import upcycle

        final = self.out / "upcycled" / "final"
        if not (final / "done.json").is_file():
            s = self.recipe.student
            kw = self.upcycle_kwargs()
            if s.select == "smart":
                kw["calibration_ids"] = self.calibration_ids()
            base = self.teacher(self.base_path)
            model = upcycle(base, s.layout, mla_layers=s.mla_layers, select=s.select, preset=s.preset,
                            linear=s.linear, **kw)
            save_model(self.accelerator, model, final, self.tokenizer, dict(kind="upcycled", layout=model.config.layout))
        return final

    def run_ild(self, stages) -> Path | None:
        from ..upcycle import assemble, convert_all, smart_select

        final = self.out / "assembled" / "final"
        if (final / "done.json").is_file():
            for st in stages:  # results of finished runs, for the summary
                for kind in self.student_kinds():
                    run = f"{st.name}/{kind}"
                    self.results[run] = finished_result(run, self.out / run / "final")
            return final
        kinds = self.student_kinds()
        finals = {}
        base = self.teacher(self.base_path)
        for kind in kinds:
            previous = None
            for st in stages:
                run = f"{st.name}/{kind}"
                if previous is None:
                    start = lambda kind=kind: convert_all(base, kind, **self.upcycle_kwargs())  # noqa: E731
                else:
                    start = lambda p=previous: self.load_hylo(p)  # noqa: E731
                res = self.train_run(run, st, start, base, ild=True)
                if res.stopped:
                    return None
                previous = res.final_dir
            finals[kind] = previous
        mixers = self.mixers
        if self.k_smart:
            mla, lin = (self.load_hylo(finals[k]) for k in kinds)
            idx, scores = smart_select(base, self.k_smart,
                                       self.calibration_ids().to(self.device), linear=kinds[1],
                                       students=(mla.to(self.device), lin.to(self.device)))
            mixers = ["mla" if i in idx else kinds[1] for i in range(len(mixers))]
            self.log(f"SMART selected MLA layers {idx}")
            if self.main:
                write_atomic(self.out / "smart_scores.json", json.dumps(scores, indent=2))
        if len(kinds) == 1:  # a layout of one block type: the student is the hybrid
            model = self.load_hylo(finals[kinds[0]])
        else:
            model = assemble(self.load_hylo(finals["mla"]), self.load_hylo(finals[kinds[1]]), mixers)
        save_model(self.accelerator, model, final, self.tokenizer, dict(kind="assembled", layout=model.config.layout,
                                           students={k: str(v) for k, v in finals.items()}))
        self.log(f"assembled {model.config.layout} (MLA layers {model.config.layer_indices('mla')}) -> {final}")
        return final

    def student_kinds(self) -> list[str]:
        return student_kinds(self.mixers)

    def run_kd(self, st: StageSpec, previous: Path) -> RunResult:
        teacher = self.teacher(self.teacher_path)

        def start():
            model = self.load_hylo(previous)
            if st.yarn is not None:
                params = apply_yarn(model, st.yarn, st.seq_len)
                self.log(f"{st.name}: YaRN on MLA layers {params}")
            return model

        result = self.train_run(st.name, st, start, teacher, ild=False)
        cache = self.topk_caches.get(st.name)
        if cache is not None:
            self.log(f"{st.name}: teacher top-k cache {cache.root}: {cache.hits} hits, {cache.misses} misses")
        return result

    def kd_targets(self, st: StageSpec, teacher, ids) -> tuple:
        """(teacher output, teacher head weight) of a KD step: teacher_kd_targets, or for kl=topk the teacher's
        top-k (ids, logprobs), read from the stage's teacher_cache when there (no teacher forward then); at
        kl_weight 0 (cross-entropy only) nothing, and no teacher forward."""
        if not st.kl_weight:
            return None, None
        if st.kl != "topk":
            return teacher_kd_targets(teacher, ids, st.kl)

        def compute():
            return teacher_topk_targets(teacher, ids, st.teacher_topk, st.temperature, st.kl_chunk_size)

        if st.teacher_cache is None:
            return compute(), None
        if st.name not in self.topk_caches:
            self.topk_caches[st.name] = TeacherTopKCache(expand(st.teacher_cache), teacher_fingerprint(
                teacher, self.teacher_path), st.teacher_topk, st.temperature)
        return self.topk_caches[st.name].targets(ids, compute), None

    # -- one training run ----------------------------------------------------------------------------------------

    def batch_layout(self, st: StageSpec) -> tuple[int, int, int]:
        return batch_layout(self.recipe, st, self.accelerator.num_processes)

    def train_run(self, name: str, st: StageSpec, start, teacher, *, ild: bool) -> RunResult:
        """One student in one stage. Set-up (model, optimizer, data, resume) is open_run, the end close_run."""
        run = self.open_run(name, st, start, teacher, ild=ild)
        if isinstance(run, RunResult):  # finished earlier, or no step left in the budget
            return run
        acc, t = self.accelerator, self.t
        if run.step == 0:
            self.evaluate(run)
        from tqdm.auto import tqdm

        bar = tqdm(total=run.steps, initial=run.step, desc=name, disable=not (t.progress and self.main),
                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        t0, tokens_here, last_ckpt = time.perf_counter(), 0, run.step
        try:
            while run.step < run.steps:
                if self.budget is not None and self.budget <= 0:
                    return self.stop_at_budget(run, checkpoint=last_ckpt != run.step)
                lr = warmup_cosine(run.step, lr=st.lr, warmup_steps=int(st.warmup * run.steps),
                                   total_steps=run.steps, min_ratio=st.min_lr_ratio)
                for group in run.optimizer.param_groups:
                    group["lr"] = lr
                rows = run.micro * run.accum
                mine = run.stream.next_batch(run.batch)[acc.process_index * rows:(acc.process_index + 1) * rows]
                loss_sum, part_sums = torch.zeros((), device=self.device), {}
                for m in range(run.accum):
                    ids = mine[m * run.micro:(m + 1) * run.micro].to(self.device)
                    with acc.no_sync(run.wrapper) if m < run.accum - 1 else contextlib.nullcontext():
                        with self.autocast():
                            if ild:
                                loss, parts = run.wrapper(teacher_states(teacher, ids))
                            else:
                                loss, parts = run.wrapper(ids, *self.kd_targets(st, teacher, ids))
                        loss = self.loss_hook(loss, name, run.step)
                        acc.backward(loss / run.accum)
                    loss_sum += loss.detach().float() / run.accum
                    for k, v in parts.items():
                        part_sums[k] = part_sums.get(k, 0) + v.float() / run.accum
                loss_value = acc.reduce(loss_sum, "mean").item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(self.nonfinite_message(name, run.step, f"loss is {loss_value}", run.dir))
                grad_norm = acc.clip_grad_norm_(run.wrapper.parameters(), t.clip if t.clip > 0 else float("inf"))
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                if not math.isfinite(grad_norm):
                    raise NonFiniteLoss(self.nonfinite_message(name, run.step, f"gradient norm is {grad_norm}",
                                                               run.dir))
                run.optimizer.step()
                run.optimizer.zero_grad(set_to_none=True)
                run.step += 1
                run.tokens += run.batch * st.seq_len
                tokens_here += run.batch * st.seq_len
                if self.budget is not None:
                    self.budget -= 1
                tok_s = tokens_here / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if run.step % t.log_every == 0 or run.step == run.steps:  # every process: parts are reduced
                    metrics = train_metrics(acc, name, loss=loss_value, lr=lr, grad_norm=grad_norm,
                                            tokens_per_s=tok_s, tokens=run.tokens, parts=part_sums)
                    if self.tracker is not None and self.main:
                        self.tracker.log_metrics(metrics, step=run.step)
                if t.eval_every and run.step % t.eval_every == 0 and run.step < run.steps:
                    self.evaluate(run)
                if t.checkpoint_every and run.step % t.checkpoint_every == 0 and run.step < run.steps:
                    self.checkpoint(run)
                    last_ckpt = run.step
        finally:
            bar.close()
        return self.close_run(run, seconds=time.perf_counter() - t0)

    def open_run(self, name: str, st: StageSpec, start, teacher, *, ild: bool) -> Run | RunResult:
        """The run's student (start()), wrapper, AdamW and data stream, prepared and restored from its newest
        checkpoint under --resume; or its RunResult when it finished earlier or the step budget is spent."""
        acc, t, r = self.accelerator, self.t, self.recipe
        run_dir = self.out / name
        final = run_dir / "final"
        result = self.results[name] = RunResult(name, None)
        if (final / "done.json").is_file():
            self.results[name] = result = finished_result(name, final)
            self.log(f"{name}: finished earlier ({final}), skipped")
            return result
        if self.budget is not None and self.budget <= 0:
            result.stopped = True
            return result
        if self.overall is not None:
            self.overall.step(name)
        bs, micro, accum = self.batch_layout(st)
        steps = st.num_steps(bs)
        torch.manual_seed(run_seed(r.seed, name, "init"))
        student = start()
        student.train()
        use_ckpt = st.activation_checkpointing if st.activation_checkpointing is not None else t.activation_checkpointing
        if use_ckpt:
            set_activation_checkpointing(student, True)
        if ild:
            # Teacher forcing never runs embeddings, final norm or head: freeze them (DDP needs every
            # trainable parameter to receive a gradient).
            for pname, p in student.named_parameters():
                p.requires_grad_(pname.startswith("model.layers."))
            wrapper = TeacherForcedStudent(student, mixer_weight=st.mixer_weight, squared=st.squared)
        else:
            wrapper = KDStudent(student, st)
        wrapper, optimizer = acc.prepare(wrapper, adamw(wrapper, st, t))
        stream = PackedStream(r.data.train, self.tokenizer, st.seq_len, seed=run_seed(r.seed, r.stages.index(st),
                                                                                         "data"),
                              synthetic=self.synthetic_for(st), sources=self.train_sources)
        run = Run(name, st, run_dir, ild, teacher, wrapper, optimizer, stream, bs, micro, accum, steps, use_ckpt,
                  result)
        ckpt, state = self.restore(name, run_dir) if self.resume else (None, None)
        if ckpt is not None:
            stream.load_state_dict(state["data"])
            run.step, run.tokens, result.eval_kl = state["step"], state["tokens"], state.get("eval_kl", [])
            self.log(f"{name}: resumed from {ckpt} at step {run.step}/{steps}")
            if state["steps"] != steps:
                self.log(f"{name}: warning: the checkpoint was written for {state['steps']} steps, the recipe now "
                         f"says {steps}: the learning-rate schedule changes from here")
        elif list_checkpoints(run_dir) or (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        return run

    def evaluate(self, run: Run):
        """Held-out metrics at the run's step: logged, kept in its eval_kl; a new best saves best/, a KL far above
        the best warns of divergence."""
        s, result = run.step, run.result
        metrics = heldout_metrics(self.accelerator, run.wrapper, run.teacher, self.heldout.get(run.stage.seq_len),
                                  run=run.name, micro=run.micro, autocast=self.autocast, ild=run.ild,
                                  seq_len=run.stage.seq_len)
        if not metrics:
            return
        value = metrics[kl_name(run.name)]
        best_step, best = best_so_far(result.eval_kl)
        result.eval_kl.append([s, value])
        self.log(f"{run.name}: step {s} held-out " + ", ".join(f"{k.rsplit('/', 1)[1]} {v:.4f}"
                                                              for k, v in metrics.items()))
        if self.tracker is not None and self.main:
            self.tracker.log_metrics(metrics, step=s)
        if value < best and s < run.steps:
            save_student(self.accelerator, run.wrapper, run.dir / "best", self.tokenizer, "best.json",
                         dict(run=run.name, step=s, eval_kl=value))
        elif is_diverging(value, best):
            self.log(f"{run.name}: warning: held-out KL {value:.4g} at step {s} is {value / max(best, 1e-12):.0f}x "
                     f"the best so far ({best:.4g} at step {best_step}): the run is diverging; the best weights are "
                     f"kept in {run.dir / 'best'}")

    def checkpoint(self, run: Run):
        state = dict(step=run.step, tokens=run.tokens, steps=run.steps, run=run.name, data=run.stream.state_dict(),
                     eval_kl=run.result.eval_kl)
        save_checkpoint(self.accelerator, run.dir, run.step, state, keep=self.t.keep_checkpoints)

    def stop_at_budget(self, run: Run, *, checkpoint: bool) -> RunResult:
        if checkpoint:
            self.checkpoint(run)
        run.result.stopped = True
        self.log(f"{run.name}: step budget reached at step {run.step}/{run.steps}; checkpoint written")
        return run.result

    def close_run(self, run: Run, *, seconds: float) -> RunResult:
        """The last evaluation; final/ (weights, tokenizer, done.json); checkpoints/ and, unless the run diverged,
        best/ removed."""
        acc, result, final = self.accelerator, run.result, run.dir / "final"
        self.evaluate(run)
        result.steps = run.steps
        result.diverged = diverged_at_end(run.dir / "best", result.eval_kl, run.steps)
        info = dict(run=run.name, stage=run.stage.name, kind=run.stage.kind, steps=run.steps, tokens=run.tokens,
                    eval_kl=result.eval_kl, seconds_this_invocation=seconds,
                    **({"diverged": result.diverged} if result.diverged else {}))
        unwrapped = acc.unwrap_model(run.wrapper).student
        for p in unwrapped.parameters():
            p.requires_grad_(True)
        if run.use_ckpt:
            set_activation_checkpointing(unwrapped, False)
        save_student(acc, run.wrapper, final, self.tokenizer, "done.json", info, model=unwrapped)
        if self.main:
            shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
            if result.diverged is None:
                shutil.rmtree(run.dir / "best", ignore_errors=True)
        acc.wait_for_everyone()
        acc.free_memory()
        result.final_dir = final
        self.log(f"{run.name}: done, {run.steps} steps -> {final}")
        if result.diverged:
            d = result.diverged
            self.log(f"{run.name}: warning: diverged: held-out KL {d['final_kl']:.4g} at the end vs {d['best_kl']:.4g} "
                     f"at step {d['best_step']}; {final} holds the last weights, {d['best_dir']} the best ones")
        return result

    def restore(self, run: str, run_dir: Path) -> tuple[Path | None, dict | None]:
        """checkpoints.restore into this run's prepared model and optimizer."""
        return restore(self.accelerator, run, run_dir, self.log)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def loss_hook(self, loss, run: str, step: int):
        """Identity; tests replace it to inject a non-finite loss."""
        return loss

    def synthetic_for(self, st: StageSpec):
        syn = self.recipe.data.synthetic
        if syn is None or st.kind == "ild":
            return None
        if st.synthetic_fraction is not None:
            import dataclasses

            syn = dataclasses.replace(syn, fraction=st.synthetic_fraction)
        return syn

    def nonfinite_message(self, run: str, step: int, what: str, run_dir: Path) -> str:
        ckpt = latest_checkpoint(run_dir)
        keep = (f"the last good checkpoint is {ckpt} (kept)" if ckpt is not None else
                "no checkpoint of this run was written yet (set train.checkpoint_every)")
        return (f"{run}: {what} at step {step + 1}; stopped before the optimizer step, nothing of this step was "
                f"saved; {keep}. Lower the learning rate or check the data and teacher, then rerun with --resume.")


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def run_recipe(recipe, *, resume: bool = False, max_steps: int | None = None, tracker=None,
               allow_recipe_change: bool = False, overall: bool = False) -> dict:
    """Run a recipe (a Recipe, a dict or a YAML path) end to end; returns the summary (summary.json).

    resume: continue the run in output_dir (finished runs are skipped, an interrupted one continues from
    its newest checkpoint). max_steps: stop after this many optimizer steps in this invocation (all runs
    together), writing a checkpoint there, so `--resume` continues exactly. tracker: a tracking.Tracker;
    None = one is made from the recipe's `tracking` section (MLflow failures are reported, not fatal).
    allow_recipe_change: let a resume continue with a recipe that differs from the recorded one.
    overall: print the overall progress line (progress.Overall) on stderr as each training run starts.
    """
    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe)
    distiller = Distiller(recipe, resume=resume, max_steps=max_steps, allow_recipe_change=allow_recipe_change,
                          overall=overall)
    distiller.setup()  # every cheap check, before a tracking run exists or a weight is loaded
    own_tracker = tracker is None
    if own_tracker:
        tracker = make_tracker(recipe, resume=resume)
    distiller.tracker = tracker if tracker is not None and tracker.active else None
    status = "FAILED"
    try:
        summary = distiller.run()
        status = "FINISHED"
        return summary
    finally:
        if own_tracker and tracker is not None:
            tracker.end(status)
