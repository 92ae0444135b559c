"""The distillation loop: a recipe (stages.py) -> stage 1 Enhanced-ILD -> assembly -> stage-2 KD stages.

`run_recipe(recipe)` does, in order, and checks everything it can before loading any weights:
  1. validate the recipe; load the tokenizer; check the teacher shares it (vocabulary, specials);
     resolve the student layout; pack one row per stage and the held-out rows (data can fill seq_len)
  2. stage 1 (ild stages): upcycle the all-MLA and the all-linear students from the base, train each
     with teacher forcing (ild.py), then assemble the hybrid by the layout. Without ild stages: upcycle
     the hybrid directly (or load `student.init`).
  3. each kd stage: load the previous stage's result, apply the stage's YaRN to the MLA layers, distil
     against the teacher (forward KL by default; full, chunked or logit-free hidden-state KL).
Every training run (one student in one stage) is the same visible loop:
    lr = warmup + cosine(step); for each micro-batch: teacher targets (no grad) -> student loss ->
    backward (accumulated); non-finite loss -> stop; clip; optimizer step; log; evaluate; checkpoint.
Outputs, under output_dir: recipe.yaml (as resolved), <stage>/[<student>/]checkpoints/step-NNNNNNNN/
(accelerate state + trainer_state.json, written to a .tmp folder and renamed, so a kill never leaves a
half-written checkpoint), <stage>/[<student>/]final/ (save_pretrained + tokenizer + done.json),
summary.json. `resume=True` skips finished runs and continues an interrupted one from its newest
readable checkpoint (an unreadable one is moved aside to step-NNNNNNNN.unreadable and the one before it
used): model, optimizer, data position, RNG and step (the schedule is a function of the step), so the
result equals an uninterrupted run's. A resume refuses a recipe that differs from the recorded one in
anything that shapes the weights unless `allow_recipe_change`; recipe.yaml is written once, when the run
starts, and each allowed change is appended to recipe_changes.yaml. While a process trains, output_dir
holds `.lock` (its pid and host); a second process is refused, a lock whose process is gone is taken over.
Divergence: when a held-out KL exceeds DIVERGED x the best one so far, a warning is logged; the weights of
the best evaluation are kept in <run>/best/ (saved at each new best, removed when the run ends within
DIVERGED x of its best) and the summary names them.

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
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.packing import PackedStream, check_fills_row, heldout_rows
from ..data.sources import open_source
from .distributed import full_state_dict, load_state, make_accelerator, save_pretrained, save_state
from .ild import TeacherForcedStudent, teacher_states
from .kd import KDStudent, apply_yarn, check_shared_tokenizer, teacher_kd_targets
from ..errors import UserError
from .stages import Recipe, RecipeError, StageSpec, expand, load_recipe, recipe_from_dict

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
DIVERGED = 10.0  # a held-out KL above this multiple of the run's best so far is reported as divergence
LOCK = ".lock"
# Recipe fields that never change what the weights become: a resume may change them freely.
BOOKKEEPING = ("name", "output_dir", "source_file", "tracking", "toy_world.root", "train.progress",
               "train.log_every", "train.device", "train.checkpoint_every", "train.keep_checkpoints",
               "train.eval_every")


class NonFiniteLoss(RuntimeError):
    """The loss (or gradient norm) became NaN / inf; the run stopped before the optimizer step."""


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def set_activation_checkpointing(model, on: bool):
    """Recompute each decoder layer in backward (non-reentrant). transformers >= 5.2x names it activation_
    checkpointing_*, earlier 5.x gradient_checkpointing_*: use whichever the installed version has."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def list_checkpoints(run_dir: Path) -> list[Path]:
    ckdir = Path(run_dir) / "checkpoints"
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def write_atomic(path: Path, text: str):
    """Write beside `path`, then rename over it: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_writable(out: Path):
    """output_dir is (or can become) a folder this process can write in; nothing is created."""
    probe = out.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise RecipeError(f"output_dir {str(out)!r} cannot be created: {str(probe)!r} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise RecipeError(f"output_dir {str(out)!r}: cannot write in {str(probe)!r} ({exc.strerror or exc}); "
                          f"choose a writable folder") from None


def _flat(value, prefix="") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} or {
            prefix[:-1]: {}}
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def recipe_changes(recorded: dict, current: dict) -> dict[str, tuple]:
    """{dotted key: (recorded value, current value)} for every field that differs, bookkeeping fields included
    ("<absent>" where one side has no such key)."""
    import yaml

    a, b = _flat(recorded), _flat(yaml.safe_load(yaml.safe_dump(current)))  # tuples -> lists, as recorded
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b), key=_key_order)
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def _key_order(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def shapes_weights(key: str) -> bool:
    return not any(key == f or key.startswith(f + ".") for f in BOOKKEEPING)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def lock_holder(out: Path) -> dict | None:
    """The live process holding output_dir's lock (its recorded pid, host, since), or None (no lock, or a stale
    one: its process is gone, or the file is unreadable)."""
    path = out / LOCK
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        pid, host = int(info["pid"]), info["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host == socket.gethostname() and not _pid_alive(pid):
        return None
    return info


def _refuse_locked(out: Path, info: dict):
    where = "" if info["host"] == socket.gethostname() else f" on host {info['host']}"
    raise UserError(f"output_dir {str(out)!r} is in use: process {info['pid']}{where} has been training there since "
                    f"{info.get('since', '?')}; wait for it to finish or choose another output_dir"
                    + (f" (if it is gone, delete {out / LOCK})" if where else ""))


@contextlib.contextmanager
def run_lock(out: Path, log):
    """Hold output_dir/.lock while the body runs; a live holder -> UserError, a stale lock is taken over."""
    path = out / LOCK
    mine = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S"))
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock_holder(out)
            if holder is not None:
                _refuse_locked(out, holder)
            try:
                old = json.loads(path.read_text())
                what = f"process {old['pid']} (since {old.get('since', '?')}), which is no longer running"
            except (OSError, ValueError, KeyError, TypeError):
                what = "an unreadable lock file"
            log(f"taking over the stale lock of {what}: {path}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    else:
        raise UserError(f"output_dir {str(out)!r}: could not take its lock {path}; another process keeps taking it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == mine["pid"]:
                path.unlink()


def _seed_for(seed: int, *parts) -> int:
    """A stable per-run seed (Python's hash() of str is salted per process, so not that)."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**31 - 1)


def finished_result(run: str, final: Path) -> "RunResult":
    info = json.loads((final / "done.json").read_text()) if (final / "done.json").is_file() else {}
    return RunResult(run, final, steps=info.get("steps", 0), eval_kl=info.get("eval_kl", []),
                     diverged=info.get("diverged"))


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RunResult:
    name: str
    final_dir: Path | None  # None when the step budget stopped the run before its end
    steps: int = 0
    eval_kl: list = field(default_factory=list)  # [(step, value)]
    stopped: bool = False
    diverged: dict | None = None  # {best_step, best_kl, final_kl, best_dir} when the run ended diverged


class Distiller:
    """Holds what every training run of one recipe shares: accelerator, tokenizer, data, tracker, budget."""

    def __init__(self, recipe: Recipe, *, resume: bool = False, max_steps: int | None = None, tracker=None,
                 allow_recipe_change: bool = False):
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
        self.results: dict[str, RunResult] = {}

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

        check_writable(self.out)
        if self.out.exists() and any(self.out.iterdir()) and not self.resume:
            raise RecipeError(f"output_dir {str(self.out)!r} already holds a run: pass --resume to continue it, or "
                              f"choose another output_dir")
        if self.resume and not self.out.exists():
            self.log(f"--resume: {self.out} does not exist yet, starting a new run")
        holder = lock_holder(self.out) if self.main else None  # other ranks would see their own main's lock
        if holder is not None:
            _refuse_locked(self.out, holder)
        if self.resume:
            self.check_recipe_matches()
        if r.uses_toy():
            from ..data.toy import get_toy_world

            names = tuple(dict.fromkeys(n[4:] for n in (r.base, r.teacher, r.tokenizer)
                                        if isinstance(n, str) and n.startswith("toy:")))
            self.log(f"toy world (teachers {', '.join(names) or 'none'}): building or reusing the cache")
            self.world = get_toy_world(r.toy_world.root, teachers=names, quick=r.toy_world.quick,
                                       seed=r.toy_world.seed, progress=t.progress and self.main)
        self.base_path = self.resolve(r.base)
        self.teacher_path = self.resolve(r.teacher_name)
        from transformers import AutoTokenizer

        tok_path = self.resolve(r.tokenizer) if r.tokenizer else self.base_path
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(tok_path)
        except Exception as exc:  # noqa: BLE001 - one clear message
            raise RecipeError(f"cannot load the tokenizer from {tok_path!r}: {exc}") from exc
        check_shared_tokenizer(self.base_path, self.teacher_path, self.tokenizer)
        self.plan_student()
        self.check_data()

    def recorded_recipe(self) -> tuple[dict | None, str]:
        """The recipe the run's weights came from: recipe.yaml, or the last allowed change after it."""
        import yaml

        changes, first = self.out / "recipe_changes.yaml", self.out / "recipe.yaml"
        try:
            if changes.is_file():
                entries = yaml.safe_load(changes.read_text()) or []
                if entries:
                    return entries[-1]["recipe"], f"{changes} (the last change allowed)"
            if first.is_file():
                return yaml.safe_load(first.read_text()), str(first)
        except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
            raise RecipeError(f"--resume: the run's recorded recipe cannot be read ({exc}); restore it or start a new "
                              f"output_dir") from exc
        return None, ""

    def check_recipe_matches(self):
        """--resume continues the recorded recipe: any change that shapes the weights is refused unless allowed."""
        recorded, where = self.recorded_recipe()
        if recorded is None:
            if self.out.is_dir() and any(self.out.iterdir()):
                self.log(f"--resume: {self.out} has no recipe.yaml; the recipe cannot be compared with the run's")
            return
        self.changes = recipe_changes(recorded, self.recipe.to_dict())
        weighty = {k: v for k, v in self.changes.items() if shapes_weights(k)}
        lines = "\n".join(f"  - {k}: {a!r} -> {b!r}" for k, (a, b) in weighty.items())
        if weighty and not self.allow_recipe_change:
            raise RecipeError(f"--resume: the recipe differs from the one the run in {str(self.out)!r} was trained with "
                              f"({where}):\n{lines}\nPass --allow-recipe-change to continue with the new recipe (the "
                              f"change is recorded in recipe_changes.yaml), revert it, or choose another output_dir")
        if weighty:
            self.log(f"--resume: continuing with a changed recipe (--allow-recipe-change), recorded in "
                     f"recipe_changes.yaml:\n{lines}")

    def resolve(self, ref: str) -> str:
        if ref.startswith("toy:"):
            return str(self.world.teacher_dirs[ref[4:]])
        p = Path(expand(ref))
        return str(p) if p.exists() else ref

    def plan_student(self):
        """The hybrid's mixers from the base config (no weights): layout errors surface here."""
        from transformers import AutoConfig

        from ..upcycle import load_base_config, plan_mixers

        s = self.recipe.student
        if s.init is not None:
            cfg = AutoConfig.from_pretrained(expand(s.init))
            if getattr(cfg, "model_type", None) != "hylo":
                raise RecipeError(f"student.init {s.init!r} is a {cfg.model_type} model, not a saved HyLo hybrid")
            self.mixers, self.dims, self.k_smart = list(cfg.mixers), {}, 0
        else:
            try:
                base_config = load_base_config(self.base_path)
                self.mixers, self.dims, self.k_smart = plan_mixers(base_config, s.layout, mla_layers=s.mla_layers,
                                                                   select=s.select, preset=s.preset, linear=s.linear)
                self.check_upcycle(base_config)
            except ValueError as exc:
                raise RecipeError(f"student: {exc}") from exc
        kinds = set(self.mixers)
        if any(st.kind == "ild" for st in self.recipe.stages):
            lin = kinds - {"mla"}
            if "attention" in kinds or len(lin) > 1:
                raise RecipeError(f"ild needs a layout of MLA and one linear block type, got {sorted(kinds)}")
        if any(st.yarn is not None for st in self.recipe.stages) and "mla" not in kinds:
            raise RecipeError("a stage sets yarn but the student has no MLA layer")

    def check_upcycle(self, base_config):
        """The weightless checks of every upcycle() call this recipe makes (the hybrid; with ild stages, the
        all-MLA and all-linear students), on the base's config: an unsupported base or a bad dim fails here."""
        import inspect

        from ..upcycle import check_upcycle, upcycle

        s = self.recipe.student
        extra = set(inspect.signature(upcycle).parameters) - set(inspect.signature(check_upcycle).parameters)
        kw = {k: v for k, v in dict(self.dims, **s.upcycle).items() if k not in extra}
        check_upcycle(base_config, s.layout, mla_layers=s.mla_layers, select=s.select, preset=s.preset,
                      linear=s.linear, **kw)
        if any(st.kind == "ild" for st in self.recipe.stages):
            for kind in self.student_kinds():
                check_upcycle(base_config, [kind] * base_config.num_hidden_layers, **kw)

    def check_data(self):
        """Each stage's seq_len can be filled from the training data; held-out rows exist for each length."""
        r = self.recipe
        self.train_sources = [open_source(s, seed=r.seed, toy_world=self.world) for s in r.data.train]
        heldout_sources = [open_source(s, seed=r.seed, toy_world=self.world) for s in r.data.heldout]
        for st in r.stages:
            try:
                check_fills_row(r.data.train, self.tokenizer, st.seq_len, seed=r.seed, sources=self.train_sources)
                if heldout_sources and st.seq_len not in self.heldout:
                    self.heldout[st.seq_len] = heldout_rows(r.data.heldout, self.tokenizer, st.seq_len,
                                                            self.t.eval_rows, seed=r.seed, sources=heldout_sources)
            except ValueError as exc:
                raise RecipeError(f"stage {st.name}: {exc}") from exc

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
                              seed=_seed_for(self.recipe.seed, "calibration"), sources=self.train_sources)
        return stream.next_batch(self.recipe.student.calibration_rows)

    # -- the whole recipe ----------------------------------------------------------------------------------------

    def run(self) -> dict:
        if self.accelerator is None:
            self.setup()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        with run_lock(self.out, self.log) if self.main else contextlib.nullcontext():
            return self._run()

    def record_recipe(self):
        """recipe.yaml once, when the run starts; an allowed change is appended to recipe_changes.yaml."""
        import yaml

        r = self.recipe
        if not (self.out / "recipe.yaml").is_file():
            write_atomic(self.out / "recipe.yaml", _yaml(r.to_dict()))
        elif self.changes and any(shapes_weights(k) for k in self.changes):
            path = self.out / "recipe_changes.yaml"
            entries = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
            entries.append(dict(since=time.strftime("%Y-%m-%d %H:%M:%S"),
                                finished_runs=sorted(str(p.parent.parent.relative_to(self.out))
                                                     for p in self.out.glob("**/final/done.json")),
                                resumed_from=sorted(str(p.parent.relative_to(self.out)) for p in
                                                    self.out.glob("**/checkpoints/step-*/trainer_state.json")),
                                changes={k: dict(old=a, new=b) for k, (a, b) in self.changes.items()},
                                recipe=yaml.safe_load(_yaml(r.to_dict()))))
            write_atomic(path, _yaml(entries))

    def _run(self) -> dict:
        r = self.recipe
        if self.main:
            self.record_recipe()
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
            self.save_model(model, final, dict(kind="upcycled", layout=model.config.layout))
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
        self.save_model(model, final, dict(kind="assembled", layout=model.config.layout,
                                           students={k: str(v) for k, v in finals.items()}))
        self.log(f"assembled {model.config.layout} (MLA layers {model.config.layer_indices('mla')}) -> {final}")
        return final

    def student_kinds(self) -> list[str]:
        kinds = []
        if "mla" in self.mixers:
            kinds.append("mla")
        kinds += sorted(set(self.mixers) - {"mla"})
        return kinds

    def run_kd(self, st: StageSpec, previous: Path) -> RunResult:
        teacher = self.teacher(self.teacher_path)

        def start():
            model = self.load_hylo(previous)
            if st.yarn is not None:
                params = apply_yarn(model, st.yarn, st.seq_len)
                self.log(f"{st.name}: YaRN on MLA layers {params}")
            return model

        return self.train_run(st.name, st, start, teacher, ild=False)

    def save_model(self, model, final: Path, info: dict):
        if self.main:
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "done.json").write_text(json.dumps(info, indent=2, default=str))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        self.accelerator.wait_for_everyone()

    # -- one training run ----------------------------------------------------------------------------------------

    def batch_layout(self, st: StageSpec) -> tuple[int, int, int]:
        """(global batch rows, micro-batch rows per process, accumulation steps)."""
        bs, micro = self.recipe.stage_batch(st)
        n = self.accelerator.num_processes
        if micro is None:
            if bs % n:
                raise RecipeError(f"stage {st.name}: batch_size={bs} does not split over {n} processes")
            micro = bs // n
        if bs % (micro * n):
            raise RecipeError(f"stage {st.name}: batch_size={bs} is not a multiple of micro_batch_size={micro} x "
                              f"{n} processes")
        return bs, micro, bs // (micro * n)

    def train_run(self, run: str, st: StageSpec, start, teacher, *, ild: bool) -> RunResult:
        acc, t, r = self.accelerator, self.t, self.recipe
        run_dir = self.out / run
        final = run_dir / "final"
        result = RunResult(run, None)
        self.results[run] = result
        if (final / "done.json").is_file():
            self.results[run] = result = finished_result(run, final)
            self.log(f"{run}: finished earlier ({final}), skipped")
            return result
        if self.budget is not None and self.budget <= 0:
            result.stopped = True
            return result
        bs, micro, accum = self.batch_layout(st)
        steps = st.num_steps(bs)
        stage_index = r.stages.index(st)
        torch.manual_seed(_seed_for(r.seed, run, "init"))
        student = start()
        student.train()
        use_ckpt = st.activation_checkpointing if st.activation_checkpointing is not None else t.activation_checkpointing
        if use_ckpt:
            set_activation_checkpointing(student, True)
        if ild:
            # Teacher forcing never runs embeddings, final norm or head: freeze them (DDP needs every
            # trainable parameter to receive a gradient).
            for name, p in student.named_parameters():
                p.requires_grad_(name.startswith("model.layers."))
            wrapper = TeacherForcedStudent(student, mixer_weight=st.mixer_weight, squared=st.squared)
        else:
            wrapper = KDStudent(student, st)
        params = [(n, p) for n, p in wrapper.named_parameters() if p.requires_grad]
        groups = [dict(params=[p for n, p in params if p.ndim >= 2], weight_decay=t.weight_decay),
                  dict(params=[p for n, p in params if p.ndim < 2], weight_decay=0.0)]
        optimizer = torch.optim.AdamW(groups, lr=st.lr, betas=tuple(t.lr_betas), eps=t.eps)
        wrapper, optimizer = acc.prepare(wrapper, optimizer)
        stream = PackedStream(r.data.train, self.tokenizer, st.seq_len, seed=_seed_for(r.seed, stage_index, "data"),
                              synthetic=self.synthetic_for(st), sources=self.train_sources)
        step, tokens = 0, 0
        ckpt, state = self.restore(run, run_dir) if self.resume else (None, None)
        if ckpt is not None:
            stream.load_state_dict(state["data"])
            step, tokens, result.eval_kl = state["step"], state["tokens"], state.get("eval_kl", [])
            self.log(f"{run}: resumed from {ckpt} at step {step}/{steps}")
            if state["steps"] != steps:
                self.log(f"{run}: warning: the checkpoint was written for {state['steps']} steps, the recipe now says "
                         f"{steps}: the learning-rate schedule changes from here")
        elif list_checkpoints(run_dir) or (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        warmup = int(st.warmup * steps)

        def lr_at(s: int) -> float:
            if s < warmup:
                return st.lr * (s + 1) / warmup
            progress = (s - warmup) / max(1, steps - warmup)
            return st.lr * (st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

        autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.bf16 else contextlib.nullcontext
        rank, n_proc = acc.process_index, acc.num_processes
        heldout = self.heldout.get(st.seq_len)
        eval_teacher = teacher
        prefix = run

        def evaluate() -> dict:
            if heldout is None:
                return {}
            wrapper.eval()
            rows = heldout[: (len(heldout) // n_proc) * n_proc][rank::n_proc]
            kl_sum, n_tok, ild_sum = (torch.zeros((), device=self.device) for _ in range(3))
            with torch.no_grad():
                for i in range(0, len(rows), micro):
                    ids = rows[i:i + micro].to(self.device)
                    with autocast():
                        th, tw = teacher_kd_targets(eval_teacher, ids, "hidden")
                        k, n = wrapper(heldout=(ids, th, tw))
                        if ild:
                            loss, _ = wrapper(teacher_states(eval_teacher, ids))
                            ild_sum += loss.float() * ids.shape[0]
                    kl_sum += k.float()
                    n_tok += n
            wrapper.train()
            kl_sum, n_tok, ild_sum = (acc.reduce(x, "sum") for x in (kl_sum, n_tok, ild_sum))
            if n_tok.item() == 0:  # fewer held-out rows than processes
                return {}
            out = {f"eval/{prefix}/kl": (kl_sum / n_tok).item()}
            if ild:  # mean over rows of the per-row-batch ILD loss
                out[f"eval/{prefix}/ild"] = (ild_sum / (n_tok / st.seq_len)).item()
            return out

        best_dir = run_dir / "best"

        def save_best(s: int, value: float):
            state_dict = full_state_dict(acc, wrapper)
            if self.main:
                tmp = run_dir / "best.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                save_pretrained(acc, acc.unwrap_model(wrapper).student, tmp,
                                {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")})
                self.tokenizer.save_pretrained(tmp)
                (tmp / "best.json").write_text(json.dumps(dict(run=run, step=s, eval_kl=value)))
                shutil.rmtree(best_dir, ignore_errors=True)
                os.replace(tmp, best_dir)
            acc.wait_for_everyone()

        def record_eval(s: int):
            metrics = evaluate()
            if metrics:
                value = metrics[f"eval/{prefix}/kl"]
                earlier = list(result.eval_kl)
                result.eval_kl.append([s, value])
                self.log(f"{run}: step {s} held-out " + ", ".join(f"{k.rsplit('/', 1)[1]} {v:.4f}" for k, v in metrics.items()))
                if self.tracker is not None and self.main:
                    self.tracker.log_metrics(metrics, step=s)
                best_step, best = min(earlier, key=lambda e: e[1]) if earlier else (None, math.inf)
                if value < best and s < steps:
                    save_best(s, value)
                elif value > DIVERGED * max(best, 1e-3):
                    self.log(f"{run}: warning: held-out KL {value:.4g} at step {s} is {value / max(best, 1e-12):.0f}x "
                             f"the best so far ({best:.4g} at step {best_step}): the run is diverging; the best "
                             f"weights are kept in {best_dir}")

        def diverged() -> dict | None:
            """At the end: the final held-out KL against the best evaluation whose weights best/ holds."""
            try:
                kept = json.loads((best_dir / "best.json").read_text())
            except (OSError, ValueError):
                return None
            final_kl = result.eval_kl[-1][1] if result.eval_kl and result.eval_kl[-1][0] == steps else None
            if final_kl is None or not final_kl > DIVERGED * max(kept["eval_kl"], 1e-3):
                return None
            return dict(best_step=kept["step"], best_kl=kept["eval_kl"], final_kl=final_kl, best_dir=str(best_dir))

        def save_checkpoint(s: int):
            ckdir = run_dir / "checkpoints"
            tmp = ckdir / f"step-{s:08d}.tmp"
            if self.main:
                shutil.rmtree(tmp, ignore_errors=True)
                ckdir.mkdir(parents=True, exist_ok=True)
            acc.wait_for_everyone()
            save_state(acc, str(tmp))
            if self.main:
                state = dict(step=s, tokens=tokens, steps=steps, run=run, data=stream.state_dict(),
                             eval_kl=result.eval_kl)
                (tmp / "trainer_state.json").write_text(json.dumps(state))
                shutil.rmtree(ckdir / f"step-{s:08d}", ignore_errors=True)  # os.replace cannot replace a folder
                os.replace(tmp, ckdir / f"step-{s:08d}")
                for old in list_checkpoints(run_dir)[:-t.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()
            return ckdir / f"step-{s:08d}"

        if step == 0:
            record_eval(0)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc=run, disable=not (t.progress and self.main), dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        t0, tokens_here, last_ckpt = time.perf_counter(), 0, step
        tag = f"train/{prefix}"
        try:
            while step < steps:
                if self.budget is not None and self.budget <= 0:
                    if last_ckpt != step:
                        save_checkpoint(step)
                    result.stopped = True
                    self.log(f"{run}: step budget reached at step {step}/{steps}; checkpoint written")
                    return result
                lr = lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                batch = stream.next_batch(bs)
                mine = batch[rank * micro * accum:(rank + 1) * micro * accum]
                loss_sum = torch.zeros((), device=self.device)
                part_sums: dict[str, torch.Tensor] = {}
                for m in range(accum):
                    ids = mine[m * micro:(m + 1) * micro].to(self.device)
                    sync = acc.no_sync(wrapper) if m < accum - 1 else contextlib.nullcontext()
                    with sync:
                        with autocast():
                            if ild:
                                loss, parts = wrapper(teacher_states(teacher, ids))
                            else:
                                t_out, t_head = teacher_kd_targets(teacher, ids, st.kl)
                                loss, parts = wrapper(ids, t_out, t_head)
                        loss = self.loss_hook(loss, run, step)
                        acc.backward(loss / accum)
                    loss_sum += loss.detach().float() / accum
                    for k, v in parts.items():
                        part_sums[k] = part_sums.get(k, 0) + v.float() / accum
                loss_value = acc.reduce(loss_sum, "mean").item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLoss(self.nonfinite_message(run, step, f"loss is {loss_value}", run_dir))
                grad_norm = acc.clip_grad_norm_(wrapper.parameters(), t.clip if t.clip > 0 else float("inf"))
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                if not math.isfinite(grad_norm):
                    raise NonFiniteLoss(self.nonfinite_message(run, step, f"gradient norm is {grad_norm}", run_dir))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens += bs * st.seq_len
                tokens_here += bs * st.seq_len
                if self.budget is not None:
                    self.budget -= 1
                elapsed = time.perf_counter() - t0
                tok_s = tokens_here / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if self.tracker is not None and self.main and (step % t.log_every == 0 or step == steps):
                    metrics = {f"{tag}/loss": loss_value, f"{tag}/lr": lr, f"{tag}/grad_norm": grad_norm,
                               f"{tag}/tokens_per_s": tok_s, f"{tag}/tokens": tokens}
                    for k, v in part_sums.items():
                        v = acc.reduce(v, "mean")
                        if v.ndim == 0:
                            metrics[f"{tag}/{k}"] = v.item()
                        else:
                            metrics.update({f"{tag}/{k}/{i}": x for i, x in enumerate(v.tolist())})
                    self.tracker.log_metrics(metrics, step=step)
                if t.eval_every and step % t.eval_every == 0 and step < steps:
                    record_eval(step)
                if t.checkpoint_every and step % t.checkpoint_every == 0 and step < steps:
                    save_checkpoint(step)
                    last_ckpt = step
        finally:
            bar.close()
        record_eval(steps)
        result.steps = steps
        result.diverged = diverged()
        info = dict(run=run, stage=st.name, kind=st.kind, steps=steps, tokens=tokens, eval_kl=result.eval_kl,
                    seconds_this_invocation=time.perf_counter() - t0,
                    **({"diverged": result.diverged} if result.diverged else {}))
        unwrapped = acc.unwrap_model(wrapper).student
        state_dict = full_state_dict(acc, wrapper)
        state_dict = {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}
        for p in unwrapped.parameters():
            p.requires_grad_(True)
        if use_ckpt:
            set_activation_checkpointing(unwrapped, False)
        if self.main:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_pretrained(acc, unwrapped, tmp, state_dict)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "done.json").write_text(json.dumps(info, indent=2))
            os.replace(tmp, final)
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            if result.diverged is None:
                shutil.rmtree(best_dir, ignore_errors=True)
        acc.wait_for_everyone()
        acc.free_memory()
        result.final_dir = final
        self.log(f"{run}: done, {steps} steps -> {final}")
        if result.diverged:
            d = result.diverged
            self.log(f"{run}: warning: diverged: held-out KL {d['final_kl']:.4g} at the end vs {d['best_kl']:.4g} at "
                     f"step {d['best_step']}; {final} holds the last weights, {d['best_dir']} the best ones")
        return result

    def restore(self, run: str, run_dir: Path) -> tuple[Path | None, dict | None]:
        """Load the newest readable checkpoint into the prepared model and optimizer -> (it, its trainer state).
        An unreadable one is moved aside (step-N.unreadable) and the one before it tried."""
        found = list_checkpoints(run_dir)
        for i, ckpt in enumerate(reversed(found)):
            try:
                state = json.loads((ckpt / "trainer_state.json").read_text())
                load_state(self.accelerator, str(ckpt))
            except UserError:  # readable, but not by this launch (FSDP vs not): keep it
                raise
            except Exception as exc:  # noqa: BLE001 - any unreadable file: torch, json, accelerate
                bad = ckpt.with_name(ckpt.name + ".unreadable")
                if self.main:
                    shutil.rmtree(bad, ignore_errors=True)
                    os.replace(ckpt, bad)
                self.accelerator.wait_for_everyone()
                older = found[len(found) - 2 - i] if i + 1 < len(found) else None
                self.log(f"{run}: warning: checkpoint {ckpt.name} cannot be read ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); moved to {bad}; "
                         + (f"falling back to {older.name}" if older else "no older checkpoint is left"))
                continue
            return ckpt, state
        if found:
            raise UserError(f"{run}: no checkpoint in {run_dir / 'checkpoints'} can be read (moved aside as "
                            f"*.unreadable); delete that folder to restart this run from its beginning")
        return None, None

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


def _indexed(value):
    """Lists of mappings -> mappings keyed "0", "1", ...: MLflow params then read stages.1.lr, data.train.0.path."""
    if isinstance(value, dict):
        return {k: _indexed(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {str(i): _indexed(v) for i, v in enumerate(value)}
    return value


def _yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def run_recipe(recipe, *, resume: bool = False, max_steps: int | None = None, tracker=None,
               allow_recipe_change: bool = False) -> dict:
    """Run a recipe (a Recipe, a dict or a YAML path) end to end; returns the summary (summary.json).

    resume: continue the run in output_dir (finished runs are skipped, an interrupted one continues from
    its newest checkpoint). max_steps: stop after this many optimizer steps in this invocation (all runs
    together), writing a checkpoint there, so `--resume` continues exactly. tracker: a tracking.Tracker;
    None = one is made from the recipe's `tracking` section (MLflow failures are reported, not fatal).
    allow_recipe_change: let a resume continue with a recipe that differs from the recorded one.
    """
    if isinstance(recipe, (str, os.PathLike)):
        recipe = load_recipe(recipe)
    elif isinstance(recipe, dict):
        recipe = recipe_from_dict(recipe)
    distiller = Distiller(recipe, resume=resume, max_steps=max_steps, allow_recipe_change=allow_recipe_change)
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


def make_tracker(recipe: Recipe, *, resume: bool = False):
    """A Tracker for this recipe (main process only): params = the whole recipe, logged once; a resumed
    run logs into the same MLflow run (its id is kept in output_dir/mlflow_run.json)."""
    from ..tracking import Tracker

    tr = recipe.tracking
    if not tr.enabled or int(os.environ.get("RANK", "0")) != 0:
        return None
    out = Path(expand(recipe.output_dir))
    id_file = out / "mlflow_run.json"
    run_id = None
    if resume and id_file.is_file():
        run_id = json.loads(id_file.read_text()).get("run_id")
    tracker = Tracker(tr.experiment, tr.run_name or recipe.name, tracking_uri=tr.tracking_uri, run_id=run_id,
                      tags={"recipe": recipe.source_file or recipe.name, "output_dir": str(out)})
    if not tracker.active:  # already reported on stderr; the run goes on without logging
        return None
    if run_id is None:
        tracker.log_params(_indexed(recipe.to_dict()))
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(id_file, json.dumps(dict(run_id=tracker.run_id, tracking_uri=tracker.tracking_uri)))
    return tracker
