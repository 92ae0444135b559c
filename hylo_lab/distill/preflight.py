"""What a recipe will do, checked before any weight is loaded, and the MLflow run it logs to.

The student's layer plan from the base's config (layout errors, every upcycle() check that needs no weights),
training data that fills each stage's rows and the held-out rows, and under --resume the recorded recipe: a
change that shapes the weights is refused unless allowed (checkpoints.BOOKKEEPING lists the fields that do not).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..data.packing import check_fills_row, heldout_rows
from ..data.sources import open_source
from .checkpoints import recipe_changes, recorded_recipe, shapes_weights, write_atomic
from .stages import Recipe, RecipeError, expand


def check_recipe_matches(out: Path, recipe: Recipe, *, allow: bool, log) -> dict[str, tuple]:
    """--resume continues the recorded recipe: any change that shapes the weights is refused unless `allow`.
    Returns every change (bookkeeping fields included)."""
    recorded, where = recorded_recipe(out)
    if recorded is None:
        if out.is_dir() and any(out.iterdir()):
            log(f"--resume: {out} has no recipe.yaml; the recipe cannot be compared with the run's")
        return {}
    changes = recipe_changes(recorded, recipe.to_dict())
    weighty = {k: v for k, v in changes.items() if shapes_weights(k)}
    lines = "\n".join(f"  - {k}: {a!r} -> {b!r}" for k, (a, b) in weighty.items())
    if weighty and not allow:
        raise RecipeError(f"--resume: the recipe differs from the one the run in {str(out)!r} was trained with "
                          f"({where}):\n{lines}\nPass --allow-recipe-change to continue with the new recipe (the "
                          f"change is recorded in recipe_changes.yaml), revert it, or choose another output_dir")
    if weighty:
        log(f"--resume: continuing with a changed recipe (--allow-recipe-change), recorded in "
            f"recipe_changes.yaml:\n{lines}")
    return changes


def student_kinds(mixers: list[str]) -> list[str]:
    """The students stage 1 trains: "mla" first (if the layout has MLA layers), then each other mixer, sorted."""
    kinds = []
    if "mla" in mixers:
        kinds.append("mla")
    kinds += sorted(set(mixers) - {"mla"})
    return kinds


def plan_student(recipe: Recipe, base_path: str) -> tuple[list[str], dict, int]:
    """The hybrid's mixers, upcycle dims and SMART's MLA count from the base config (no weights), or from
    student.init's config: layout errors surface here."""
    from transformers import AutoConfig

    from ..upcycle import load_base_config, plan_mixers

    s = recipe.student
    if s.init is not None:
        cfg = AutoConfig.from_pretrained(expand(s.init))
        if getattr(cfg, "model_type", None) != "hylo":
            raise RecipeError(f"student.init {s.init!r} is a {cfg.model_type} model, not a saved HyLo hybrid")
        mixers, dims, k_smart = list(cfg.mixers), {}, 0
    else:
        try:
            base_config = load_base_config(base_path)
            mixers, dims, k_smart = plan_mixers(base_config, s.layout, mla_layers=s.mla_layers, select=s.select,
                                                preset=s.preset, linear=s.linear)
            check_upcycle(recipe, base_config, dims, mixers)
        except ValueError as exc:
            raise RecipeError(f"student: {exc}") from exc
    kinds = set(mixers)
    if any(st.kind == "ild" for st in recipe.stages):
        lin = kinds - {"mla"}
        if "attention" in kinds or len(lin) > 1:
            raise RecipeError(f"ild needs a layout of MLA and one linear block type, got {sorted(kinds)}")
    if any(st.yarn is not None for st in recipe.stages) and "mla" not in kinds:
        raise RecipeError("a stage sets yarn but the student has no MLA layer")
    return mixers, dims, k_smart


def check_upcycle(recipe: Recipe, base_config, dims: dict, mixers: list[str]):
    """The weightless checks of every upcycle() call this recipe makes (the hybrid; with ild stages, the
    all-MLA and all-linear students), on the base's config: an unsupported base or a bad dim fails here."""
    import inspect

    from ..upcycle import check_upcycle as check, upcycle

    s = recipe.student
    extra = set(inspect.signature(upcycle).parameters) - set(inspect.signature(check).parameters)
    kw = {k: v for k, v in dict(dims, **s.upcycle).items() if k not in extra}
    check(base_config, s.layout, mla_layers=s.mla_layers, select=s.select, preset=s.preset, linear=s.linear, **kw)
    if any(st.kind == "ild" for st in recipe.stages):
        for kind in student_kinds(mixers):
            check(base_config, [kind] * base_config.num_hidden_layers, **kw)


def check_data(recipe: Recipe, tokenizer, world, eval_rows: int) -> tuple[list, dict[int, torch.Tensor]]:
    """Each stage's seq_len can be filled from the training data -> (the opened training sources, held-out rows
    [eval_rows, seq_len] per stage length; none without held-out data)."""
    r = recipe
    train_sources = [open_source(s, seed=r.seed, toy_world=world) for s in r.data.train]
    heldout_sources = [open_source(s, seed=r.seed, toy_world=world) for s in r.data.heldout]
    heldout: dict[int, torch.Tensor] = {}
    for st in r.stages:
        try:
            check_fills_row(r.data.train, tokenizer, st.seq_len, seed=r.seed, sources=train_sources)
            if heldout_sources and st.seq_len not in heldout:
                heldout[st.seq_len] = heldout_rows(r.data.heldout, tokenizer, st.seq_len, eval_rows, seed=r.seed,
                                                   sources=heldout_sources)
        except ValueError as exc:
            raise RecipeError(f"stage {st.name}: {exc}") from exc
    return train_sources, heldout


def _indexed(value):
    """Lists of mappings -> mappings keyed "0", "1", ...: MLflow params then read stages.1.lr, data.train.0.path."""
    if isinstance(value, dict):
        return {k: _indexed(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return {str(i): _indexed(v) for i, v in enumerate(value)}
    return value


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
