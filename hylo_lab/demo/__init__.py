"""The embedded default: the whole HyLo recipe on the offline toy world, as plain functions.

    toy world + teachers (cached) -> upcycle llama-s to MLA + GDN/Mamba2 -> stage 1 Enhanced-ILD -> stage 2 KD
    (staged: the teachers' length, then a longer one with YaRN on the MLA layers) -> NIAH accuracy,
    short-context perplexity and cache bytes of the teacher (with and without YaRN) and the hybrid at 1x .. 32x
    the teacher's training length -> figures, a summary table, MLflow.

`notebooks/00_quickstart.ipynb` calls these one per cell; `hylo-lab demo` executes that notebook with papermill
(`run_demo`) and writes the executed notebook, its HTML and the PNG figures to one folder. `DemoSettings` holds
exactly the notebook's parameters, so ablation sweeps (ablations/*.yaml) set the same names.

Metric names (one MLflow run), one scheme for every model (teacher, teacher_yarn, hybrid):
`eval/<model>/niah/<length>` (the ablations compare `eval/hybrid/niah/<length>`), per task
`eval/<model>/niah/<length>/<task>`, `eval/<model>/ppl/<length>`, `eval/<model>/cache_bytes[_measured]/<length>`;
training curves `train/teacher/<name>/loss` (the toy teachers) and `train/<stage>/...` (the hybrid). Single values
(goals, ratios, timings, the teacher check) are the run's summary: `summary.*` tags and tables/summary.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from ..data.toy import TOY_TRAIN_LEN
from .evaluation import evaluate_models, load_models, mla_yarn
from .report import (GOALS, QUESTION, conclusion, figures, model_labels, relative_uri, report, report_text,
                     save_figure, show_figure, summarize, summary_table)
from .run import notebook_path, report_first, run_demo
from ..errors import UserError
from .settings import (DEFAULT_OUT, NIAH_TASKS, QUICK_PARAMETERS, RECIPE, STEPS_FULL, STEPS_QUICK, YARN_EVAL,
                       DemoSettings, build_recipe, log, step, warn_outside_yarn, with_linear, yarn_factor_at)

__all__ = ["DEFAULT_OUT", "GOALS", "NIAH_TASKS", "QUESTION", "QUICK_PARAMETERS", "RECIPE", "YARN_EVAL", "DemoSettings",
           "UserError", "build_recipe", "conclusion", "distill", "evaluate_models", "figures", "finish", "load_models",
           "log", "mla_yarn", "model_labels", "notebook_path", "prepare_world", "relative_uri", "report",
           "report_first", "report_text", "run_demo", "save_figure", "show_figure", "start", "step", "summarize",
           "summary_table", "teacher_check", "warn_outside_yarn", "with_linear", "yarn_factor_at"]


def start(settings: DemoSettings):
    """Make the output folder and the MLflow run (the given run_id under a sweep); log the settings once.
    Returns the Tracker (inactive when MLflow is unreachable: the demo goes on without logging)."""
    from ..progress import Overall, quiet_third_party
    from ..tracking import Tracker, run_name

    quiet_third_party()
    settings._overall = Overall("demo", STEPS_QUICK if settings.quick else STEPS_FULL, echo=log)
    step(settings, "start")
    folder = settings.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "figures").mkdir(exist_ok=True)
    name = run_name("demo-quick" if settings.quick else "demo", settings.student_layout, f"seed{settings.seed}")
    tracker = Tracker(settings.experiment, name,
                      tracking_uri=settings.tracking_uri or None, run_id=settings.run_id or None,
                      parent_run_id=settings.parent_run_id or None, tags={"notebook": "notebooks/00_quickstart.ipynb"})
    tracker.log_params({k: v for k, v in settings.to_dict().items() if k not in ("run_id", "parent_run_id")}
                       | dict(student_layout=settings.student_layout, mixers=settings.mixers))
    import torch

    device = "cuda" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} thread(s)"
    tracker.set_tags({"device": device})
    log(f"settings: {json.dumps(settings.to_dict())}; output in {folder}; MLflow run {tracker.run_id}; "
        f"{device}, load average {os.getloadavg()[0]:.1f}")
    settings._t0 = time.perf_counter()
    return tracker


def prepare_world(settings: DemoSettings, tracker=None):
    """Build or reuse the toy world of `world_seed` with the base teacher and the stage-2 teacher (trained once,
    cached, shared by every `seed`: world_seed=0 is get_toy_world(seed=0)'s cache)."""
    from ..data.toy import get_toy_world

    step(settings, "world")
    names = settings.teachers
    t0 = time.perf_counter()
    log(f"toy world with teachers {', '.join(names)} (cached after the first build)")
    spec = settings.recipe["toy_world"]
    world = get_toy_world(teachers=names, quick=spec["quick"], seed=settings.world_seed,
                          training=spec.get("training"), digit_group=spec.get("digit_group", 1))
    seconds = time.perf_counter() - t0
    log(f"toy world ready in {seconds:.0f} s at {world.root}")
    if tracker is not None:
        tracker.set_tags({"toy_world": str(world.root)})
        settings._seconds = dict(getattr(settings, "_seconds", {}), toy_world=seconds)
        for name in names:
            info = world.teacher_info(name)
            tracker.log_curve(f"train/teacher/{name}/loss", info.get("loss", []))
            settings._teachers = dict(getattr(settings, "_teachers", {}), **{
                name: dict(train_seconds=info["seconds"], loss_last=info["loss_last"])})
    return world


def teacher_check(settings: DemoSettings, world, tracker=None) -> dict:
    """Does the base teacher work? NIAH accuracy (the demo's tasks) at its training length and held-out
    perplexity against a unigram model."""
    from ..data.toy import niah_accuracy, perplexity, read_corpus, resolve_device, unigram_perplexity

    step(settings, "teacher_check")
    base = settings.base
    tok, model = world.tokenizer(), world.teacher(base).to(resolve_device())
    n = settings.niah_samples(base, TOY_TRAIN_LEN)
    acc = niah_accuracy(model, tok, lengths=(TOY_TRAIN_LEN,), num_samples=n, seed=settings.eval_seed, tasks=NIAH_TASKS)
    heldout, train = read_corpus(world.corpus_heldout), read_corpus(world.corpus_train)
    ppl = perplexity(model, tok, heldout[:200])
    uni = unigram_perplexity(tok, train[:3000], heldout[:200])
    per_task = acc[TOY_TRAIN_LEN]
    check = dict(niah=sum(per_task.values()) / len(per_task), niah_tasks=per_task, heldout_ppl=ppl, unigram_ppl=uni)
    log(f"teacher {base}: NIAH at {TOY_TRAIN_LEN} = {check['niah']:.2f} {per_task}; held-out ppl {ppl:.2f} "
        f"(unigram {uni:.1f})")
    return check  # single values: summarize() logs them with the run's summary


def distill(settings: DemoSettings, recipe: dict, tracker=None) -> Path:
    """Run the recipe into out_dir/distill (a previous demo's folder there is replaced); returns the final
    hybrid's folder. Training curves go to the demo's MLflow run.

    Stage-1 cache (stage_cache.py): points of a sweep that share the first stage (the ild stage of
    recipes/demo.yaml) train it once. Its key covers the recipe cut to the first stage (without output_dir,
    tracking and, for ild, the stage-2 teacher), the bytes of the toy world and models it reads, hylo_lab's code
    outside demo/eval/sweep and the torch / transformers versions and device. A hit copies the stored stage into
    out_dir/distill and resumes the recipe there (the trainer skips the finished runs, its recipe check unchanged);
    a miss trains as without a cache, then stores the stage in <toy world root>/stage1/<key>/ (written beside,
    renamed into place). One line says which; the MLflow run is tagged `stage1` (reused: no stage-1 training
    curves in it). HYLO_LAB_STAGE1_CACHE=0 turns it off."""
    from ..distill.stages import recipe_from_dict
    from ..distill.trainer import run_recipe
    from . import stage_cache

    step(settings, "distill")
    out = Path(recipe["output_dir"])
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    log("distillation: " + ", ".join(f"{st['name']} ({st['seq_len']} tokens, {st['steps']} steps"
                                     + (f", YaRN x{st['yarn']['factor']:g}" if st.get("yarn") else "") + ")"
                                     for st in recipe["stages"]))
    active = tracker if tracker is not None and tracker.active else None
    if active is not None:
        from ..tracking import flatten

        stages = {st["name"]: st for st in recipe["stages"]}
        active.log_params({f"recipe.{k}": v for k, v in flatten(dict(stages=stages, student=recipe["student"],
                                                                         data=recipe["data"])).items()})
    spec = recipe_from_dict(recipe)
    cache = stage_cache.prepare(spec, out, log)
    if active is not None and cache:
        active.set_tags({"stage1": f"reused {cache['hit']}" if cache["hit"] else "trained"})
    with contextlib.redirect_stderr(sys.stdout):  # its [distill] lines are progress, not errors, in the report
        summary = run_recipe(recipe, tracker=active, resume=bool(cache.get("hit")))
    stage_cache.finish(cache, spec, out, log)
    seconds = time.perf_counter() - t0
    log(f"distillation done in {seconds:.0f} s -> {summary['final_model']}")
    if active is not None:
        settings._seconds = dict(getattr(settings, "_seconds", {}), distill=seconds)
        active.set_tags({"final_model": summary["final_model"]})
    return Path(summary["final_model"])


def finish(settings: DemoSettings, tracker=None) -> None:
    if tracker is not None and not settings.run_id:  # a sweep ends the runs it created itself
        tracker.end()
    overall = getattr(settings, "_overall", None)
    if overall is not None:
        overall.done()
    if tracker is not None and tracker.active:
        log(f"MLflow run: {tracker.url()}")
