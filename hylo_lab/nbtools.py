"""What the notebooks in notebooks/ call besides the library's own entry points, so that every notebook cell is
one call: model references, the notebook's MLflow run, inspecting a conversion (SVD spectra, per-layer KL at
init), live loss curves while a recipe trains, evaluating several models into one table, finding sweeps.

Model references (notebook parameters are plain strings): "toy:NAME" is a teacher of the toy world
(hylo_lab.data.toy, built on first use under $HYLO_LAB_HOME), anything else a saved model folder or a hub id.
Relative paths are read from the project root, so a notebook gives the same answer in JupyterLab (whose kernel
runs in notebooks/) and under papermill or a sweep (run from the root).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def project_root() -> Path:
    """The checkout holding this package (editable install), else the current directory."""
    return _PACKAGE_ROOT if (_PACKAGE_ROOT / "pyproject.toml").is_file() else Path.cwd()


def project_path(path) -> Path:
    """An absolute path as is; a relative one against the current directory when it exists there, else against
    the project root."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p.resolve()
    return project_root() / p


def resolve_tracking_uri(uri: str = "") -> str:
    """`uri`, else the one default store (tracking.default_tracking_uri)."""
    from .tracking import default_tracking_uri

    return uri or default_tracking_uri()


def start_run(notebook: str, experiment: str, params: dict, *, run_id: str = "", parent_run_id: str = "",
              tracking_uri: str = "", run_name: str = ""):
    """The notebook's Tracker: the run a sweep created for it (`run_id`), else a new run (a child of
    `parent_run_id` when given), tagged `notebook`; `params` logged once."""
    from .tracking import Tracker

    tag = {"notebook": f"notebooks/{notebook}.ipynb"}
    tracker = Tracker(experiment, run_name or notebook, tracking_uri=resolve_tracking_uri(tracking_uri), tags=tag,
                      run_id=run_id or None, parent_run_id=parent_run_id or None)
    if run_id:
        tracker.set_tags(tag)
    tracker.log_params(params)
    return tracker


def _plain(kwargs: dict) -> dict:
    """Notebook sentinels -> library defaults: "" -> None, and prefill_chunk 0 -> None (one pass)."""
    out = {k: (None if v == "" else v) for k, v in kwargs.items()}
    if out.get("prefill_chunk") == 0:
        out["prefill_chunk"] = None
    return out


def split(text: str, kind=str) -> list:
    """"256, 512" -> [256, 512] (kind=int); "" -> []."""
    from .config import parse_list

    return parse_list(text, kind)


# ---------------------------------------------------------------------------------------------------------------
# Models


def model_path(ref: str, *, quick: bool = True) -> str:
    """"toy:NAME" -> that toy teacher's folder (trained on first use); a path -> its absolute form; else (a hub
    id) unchanged."""
    if ref.startswith("toy:"):
        from .data.toy import get_toy_world

        name = ref[4:]
        return str(get_toy_world(teachers=(name,), quick=quick, progress=False).teacher_dirs[name])
    p = project_path(ref)
    return str(p) if p.exists() else ref


def model_label(ref: str) -> str:
    """A short name for metric names and legends: toy:llama-s -> llama-s; runs/x/kd/final -> kd; a/b -> b."""
    if ref.startswith("toy:"):
        return ref[4:]
    parts = Path(ref.rstrip("/")).parts
    name = parts[-2] if len(parts) > 1 and parts[-1] == "final" else parts[-1]
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in name)


def upcycle_options(*, mla_layers: str = "", linear: str = "gdn", layout: str = "", q_lora_rank: int = -1,
                    kv_lora_rank: int = -1, rank_energy: float = -1.0, rope_init: str = "filled", seed: int = 0) -> dict:
    """Notebook parameters -> keyword arguments of `upcycle`: the sentinels -1 / "" become None (left out:
    upcycle's default); q_lora_rank 0 stays 0, upcycle's "no query compression"."""
    kw = dict(linear=linear or None, rope_init=rope_init, seed=seed)
    if layout:
        kw["layout"] = layout
    if mla_layers:
        kw["mla_layers"] = split(mla_layers, int)
    if layout and not mla_layers:
        kw["select"] = "uniform"
    for name, value in (("q_lora_rank", q_lora_rank), ("kv_lora_rank", kv_lora_rank), ("rank_energy", rank_energy)):
        if value != -1:
            kw[name] = value
    return kw


def calibration_ids(ref: str, *, quick: bool = True, tokens: int = 2048, seq_len: int = 256, text_file: str = ""):
    """[rows, seq_len] token ids to measure KL on: `text_file`, else the toy world's held-out corpus for a toy
    model, else seeded random ids (upcycle_io.calibration_batch)."""
    from .upcycle_io import calibration_batch

    if not text_file and ref.startswith("toy:"):
        from .data.toy import get_toy_world

        text_file = str(get_toy_world(teachers=(), quick=quick, progress=False).corpus_heldout)
    return calibration_batch(model_path(ref, quick=quick), text_file=text_file or None, tokens=tokens,
                             seq_len=seq_len)


# ---------------------------------------------------------------------------------------------------------------
# Inspecting a conversion


def svd_spectra(base, config, *, rope_init: str = "filled", qk_norm: str = "fold"):
    """Singular values of the two matrices MLA factorises (layers/mla.py: the per-head query rows and the stacked
    [K_nope; V] rows), for every layer of `base` with the dims of the hybrid `config`. DataFrame(layer, matrix
    "q" | "kv", index, sigma, energy (cumulative share of sum sigma^2 up to index), rank (config's), mla
    (the layer is MLA in the plan)). matrix "q" is absent when queries are not compressed."""
    import pandas as pd
    import torch

    from .base_checkpoint import AttentionWeights, base_shape, load_base_model
    from .layers.mla import attention_targets

    model = load_base_model(base)
    shape = base_shape(model.config)
    mla = set(config.layer_indices("mla"))
    rows = []
    for i, layer in enumerate(model.model.layers):
        w = AttentionWeights(layer, shape, torch.float32).fold_qk_norm(qk_norm)
        q, _, _, _, kv, _ = attention_targets(w, config.qk_nope_head_dim, config.qk_rope_head_dim, rope_init)
        for name, mat, rank in (("q", q, config.q_lora_rank), ("kv", kv, config.kv_lora_rank)):
            if rank is None:
                continue
            s = torch.linalg.svdvals(mat.double())
            energy = (s.pow(2).cumsum(0) / s.pow(2).sum().clamp_min(1e-300)).tolist()
            rows += [dict(layer=i, matrix=name, index=j + 1, sigma=float(v), energy=e, rank=int(rank), mla=i in mla)
                     for j, (v, e) in enumerate(zip(s.tolist(), energy))]
    return pd.DataFrame(rows, columns=["layer", "matrix", "index", "sigma", "energy", "rank", "mla"])


def kept_energy(spectra):
    """Share of sum sigma^2 the kept rank holds, per layer and matrix: DataFrame(layer, matrix, rank, kept, mla)."""
    df = spectra[spectra["index"] <= spectra["rank"]]
    kept = df.groupby(["layer", "matrix"], as_index=False).agg(rank=("rank", "first"), kept=("energy", "max"),
                                                               mla=("mla", "first"))
    return kept.sort_values(["matrix", "layer"], ascending=[False, True]).reset_index(drop=True)


def init_kl(student, base, ids) -> float:
    """Mean over tokens of KL(base || student) on `ids`, right after conversion."""
    import torch
    import torch.nn.functional as F

    from .base_checkpoint import load_base_model
    from .smart import kl_to_teacher

    teacher = load_base_model(base)
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
        return kl_to_teacher(student(ids, use_cache=False).logits, target)


def layer_kl(base, ids, kinds=None, **upcycle_kwargs):
    """What converting one layer costs at init: for every layer i and block kind, KL(base || the base with only
    layer i converted to that kind) on `ids` (other layers keep the base's attention verbatim). One conversion
    per layer and kind (default: every mixer of mixers.MIXERS but attention). Placement keywords (layout,
    mla_layers, select, linear) are ignored. DataFrame(layer, kind, kl)."""
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from .base_checkpoint import load_base_model
    from .mixers import MIXERS
    from .smart import kl_to_teacher
    from .upcycle import upcycle

    kinds = kinds or [m for m in MIXERS if m != "attention"]

    kw = {k: v for k, v in upcycle_kwargs.items() if k not in ("layout", "mla_layers", "select", "linear", "preset")}
    teacher = load_base_model(base)
    n = teacher.config.num_hidden_layers
    rows = []
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
        for kind in kinds:
            for i in range(n):
                mixers = ["attention"] * n
                mixers[i] = kind
                student = upcycle(teacher, mixers, **kw)
                rows.append(dict(layer=i, kind=kind, kl=kl_to_teacher(student(ids, use_cache=False).logits, target)))
    return pd.DataFrame(rows, columns=["layer", "kind", "kl"])


def upcycle_metrics(student, spectra, per_layer, hybrid_kl: float) -> dict:
    """The numbers 01_upcycle logs: init/kl/hybrid, init/kl/<kind>/<layer>, upcycle/kept_energy/<matrix>/<layer>
    (MLA layers of the plan), parameter count."""
    out = {"init/kl/hybrid": hybrid_kl, "upcycle/params": sum(p.numel() for p in student.parameters())}
    out.update({f"init/kl/{r.kind}/{r.layer}": float(r.kl) for r in per_layer.itertuples()})
    kept = kept_energy(spectra)
    out.update({f"upcycle/kept_energy/{r.matrix}/{r.layer}": float(r.kept) for r in kept[kept.mla].itertuples()})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Distillation


def distill_recipe(recipe: str = "", *, out_dir: str = "", quick: bool = True, base: str = "toy:llama-s",
                   teacher: str = "", mla_layers: str = "1", linear: str = "gdn", seq_len: int = 256,
                   ild_steps: int = 30, kd_steps: int = 30, batch_size: int = 8, lr: float = 2e-3,
                   eval_every: int = 10, seed: int = 0):
    """A Recipe for 02_distill. `recipe` (a YAML path) runs as written, only `out_dir` replaces its output_dir;
    "" builds the toy recipe from the other arguments: Enhanced-ILD for `ild_steps`, then KD from `teacher`
    ("" = the base) for `kd_steps`, both at `seq_len` on toy-world text with NIAH rows mixed into KD.
    Tracking is left to the notebook's own run. out_dir "" = runs/notebooks/02_distill/<time>/."""
    from .distill.stages import load_recipe, recipe_from_dict

    out = str(project_path(out_dir)) if out_dir else str(
        project_root() / "runs" / "notebooks" / "02_distill" / time.strftime("%Y%m%d-%H%M%S"))
    if recipe:
        r = load_recipe(project_path(recipe))
        r.output_dir = out
        r.tracking.enabled = False
        return r
    stages = [dict(name="ild", kind="ild", seq_len=seq_len, steps=ild_steps, lr=lr, warmup=0.05)] if ild_steps else []
    if kd_steps:
        stages.append(dict(name="kd", kind="kd", seq_len=seq_len, steps=kd_steps, lr=lr / 2, warmup=0.05))
    return recipe_from_dict(dict(
        name="notebook-distill", output_dir=out, seed=seed, base=base, teacher=teacher or None,
        toy_world=dict(quick=quick, seed=seed),
        student=dict(mla_layers=split(mla_layers, int), linear=linear),
        data=dict(train=[dict(type="toy", split="train")], heldout=[dict(type="toy", split="heldout")],
                  synthetic=dict(fraction=0.3, tasks=["niah"], answer_room=48)),
        train=dict(batch_size=batch_size, eval_every=eval_every, eval_rows=max(2, batch_size), progress=False),
        tracking=dict(enabled=False),
        stages=stages))


class LiveLoss:
    """A tracker for `run_recipe` that also redraws the training loss and held-out KL in the notebook (at most
    every `every_s` seconds, in one output that updates in place) while passing everything to `tracker`."""

    active = True  # run_recipe keeps only active trackers; this one draws even when MLflow is off

    def __init__(self, tracker=None, *, every_s: float = 2.0, show: bool = True):
        self.tracker, self.every_s, self.show = tracker, every_s, show
        self.rows: list[dict] = []
        self._handle, self._drawn = None, 0.0

    def __getattr__(self, name):  # log_artifact, log_dict, set_tags, ... go to the wrapped tracker
        if self.tracker is None:
            return lambda *args, **kwargs: None
        return getattr(self.tracker, name)

    def log_metrics(self, metrics: dict, step: int | None = None):
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=step)
        for name, value in metrics.items():
            split_, _, rest = name.partition("/")
            run, _, what = rest.rpartition("/")
            if (split_, what) in (("train", "loss"), ("eval", "kl")):
                self.rows.append(dict(run=run, split=split_, step=step or 0, value=float(value)))
        if self.show and time.monotonic() - self._drawn >= self.every_s:
            self.draw()

    def history(self):
        """DataFrame(run, split "train" | "eval", step, value): train/<run>/loss and eval/<run>/kl as logged."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["run", "split", "step", "value"])

    def figure(self):
        from .plots import loss_curves

        return loss_curves(self.history())

    def draw(self):
        import io

        from IPython.display import Image, display

        self._drawn = time.monotonic()
        buf = io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=90, bbox_inches="tight")
        image = Image(data=buf.getvalue())
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def distill_metrics(summary: dict) -> dict:
    """distill/<run>/steps and distill/<run>/eval_kl (the last held-out KL) of each training run in the summary."""
    out = {}
    for run, info in summary["runs"].items():
        out[f"distill/{run}/steps"] = info["steps"]
        if info.get("eval_kl"):
            out[f"distill/{run}/eval_kl"] = info["eval_kl"][-1][1]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of several models


def evaluate_models(models: str, suites: str = "ruler,niah", *, labels: str = "", quick: bool = True, tracker=None,
                    out_dir: str = "", **evaluate_kwargs) -> dict:
    """`eval.evaluate` for each model of a comma list (model references, labelled by `labels` or model_label),
    logging each under its label; lengths, depths and tasks may be comma strings, "" / 0 mean the default.
    Returns the tables with a `model` column, ready for plots: "ruler" (task x length), "ruler_average", "niah"
    (length x depth), "efficiency" (rows), as far as the suites ran."""
    import pandas as pd

    from .eval import evaluate, load_model

    refs = split(models)
    names = split(labels) or [model_label(r) for r in refs]
    if len(names) != len(refs):
        raise ValueError(f"{len(refs)} models but {len(names)} labels")
    evaluate_kwargs = _plain(evaluate_kwargs)
    device = evaluate_kwargs.pop("device", None)
    for key, kind in (("lengths", int), ("depths", float), ("tasks", str)):  # comma strings from parameters
        if isinstance(evaluate_kwargs.get(key), str):
            evaluate_kwargs[key] = split(evaluate_kwargs[key], kind)
    parts: dict[str, list] = {}
    for ref, label in zip(refs, names):
        model, tokenizer = load_model(model_path(ref, quick=quick), device=device)
        res = evaluate(model, suites, tokenizer=tokenizer, tracker=tracker, label=label,
                       out_dir=str(project_path(out_dir)) if out_dir else None, **evaluate_kwargs)
        if "ruler" in res:
            parts.setdefault("ruler", []).append(res["ruler"]["table"].assign(model=label))
            parts.setdefault("ruler_average", []).append(res["ruler"]["average"].assign(model=label))
        if "niah" in res:
            parts.setdefault("niah", []).append(res["niah"].assign(model=label))
        if "efficiency" in res:
            parts.setdefault("efficiency", []).append(pd.DataFrame(res["efficiency"]).assign(model=label))
    return {k: pd.concat(v, ignore_index=True) for k, v in parts.items()}


def long_context_metrics(tables: dict) -> dict:
    """summary/ruler/<model> and summary/niah/<model>: each model's mean accuracy over every length run."""
    out = {}
    if "ruler_average" in tables:
        out.update({f"summary/ruler/{m}": float(g.average.mean()) for m, g in tables["ruler_average"].groupby("model")})
    if "niah" in tables:
        ok = tables["niah"][tables["niah"].status == "ok"]
        out.update({f"summary/niah/{m}": float(g.score.mean()) for m, g in ok.groupby("model")})
    return out


def measure_models(models: str, lengths: str, *, hybrid_mla_layers: str = "", linear: str = "gdn",
                   quick: bool = True, tracker=None, **measure_kwargs):
    """eval.measure_efficiency for each model of a comma list, plus (when `hybrid_mla_layers` is set) the first
    model upcycled to MLA at those layers and `linear` elsewhere, untrained: memory and speed do not depend on
    the weights. DataFrame of the rows with a `model` column."""
    import pandas as pd

    from .eval import load_model
    from .eval.efficiency import measure_efficiency

    measure_kwargs = _plain(measure_kwargs)
    refs = split(models)
    entries = [(model_label(r), lambda r=r: load_model(model_path(r, quick=quick), device="cpu")[0]) for r in refs]
    if hybrid_mla_layers:
        from .upcycle import upcycle

        kw = upcycle_options(mla_layers=hybrid_mla_layers, linear=linear)
        label = f"{model_label(refs[0])}-hybrid"
        entries.append((label, lambda: upcycle(model_path(refs[0], quick=quick), **kw)))
    frames = []
    for label, load in entries:
        rows = measure_efficiency(load(), split(lengths, int), tracker=tracker, label=label, **measure_kwargs)
        frames.append(pd.DataFrame(rows).assign(model=label))
    return pd.concat(frames, ignore_index=True)


def efficiency_metrics(rows) -> dict:
    """At each model's longest measured length: summary/<model>/{length, ttft_s, tpot_s, cache_mib}."""
    out = {}
    for model, g in rows[rows.status == "ok"].groupby("model", sort=False):
        last = g.sort_values("length").iloc[-1]
        out.update({f"summary/{model}/length": int(last.length), f"summary/{model}/ttft_s": float(last.ttft_s),
                    f"summary/{model}/tpot_s": float(last.tpot_s),
                    f"summary/{model}/cache_mib": float(last.cache_bytes_measured) / 2**20})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sweeps in MLflow


def list_sweeps(uri: str = ""):
    """Every sweep's parent run in the store, newest first: DataFrame(name, experiment, status, started, points,
    finished, failed, parent_run_id)."""
    import pandas as pd

    from .tracking import find_runs

    uri = resolve_tracking_uri(uri)
    parents = find_runs(None, "tags.sweep_role = 'parent'", tracking_uri=uri)
    rows = []
    for p in parents:
        children = find_runs(p["experiment"], f"tags.mlflow.parentRunId = '{p['run_id']}'", tracking_uri=uri)
        status = [c["status"] for c in children]
        rows.append(dict(name=p["tags"].get("sweep_name"), experiment=p["experiment"], status=p["status"],
                         started=pd.to_datetime(p["start_time"], unit="ms"), points=len(children),
                         finished=status.count("FINISHED"), failed=status.count("FAILED"), parent_run_id=p["run_id"]))
    return pd.DataFrame(rows, columns=["name", "experiment", "status", "started", "points", "finished", "failed",
                                       "parent_run_id"])


def pick_sweep(sweep: str, sweeps) -> str:
    """`sweep` when given (a YAML path or a name), else the newest sweep in `sweeps` (list_sweeps)."""
    if sweep:
        return str(project_path(sweep)) if sweep.endswith((".yaml", ".yml")) else sweep
    if not len(sweeps):
        raise LookupError("no sweep in this MLflow store yet: run one first, e.g. "
                          "`hylo-lab sweep ablations/layer_ratio.yaml`, or set the `sweep` parameter")
    return str(sweeps.name.iloc[0])


def results_dir(out_dir: str, sweep: str) -> Path:
    """Where 05_compare_runs writes a sweep's figures and runs.csv: `out_dir`, else ablations/results/<name>/ under
    the project root (what `hylo-lab compare` writes from the root), whatever the kernel's directory."""
    if out_dir:
        return project_path(out_dir)
    return project_root() / "ablations" / "results" / (Path(sweep).stem if sweep.endswith((".yaml", ".yml")) else sweep)


def compare_metrics(frame) -> dict:
    """compare/points, compare/finished, compare/failed and compare/duration_s (sum) of a sweep's table."""
    return {"compare/points": len(frame), "compare/finished": int((frame.status == "FINISHED").sum()),
            "compare/failed": int((frame.status == "FAILED").sum()),
            "compare/duration_s": float(frame.duration_s.sum(skipna=True))}
