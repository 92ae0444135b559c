"""The embedded default: the whole HyLo recipe on the offline toy world, as plain functions (issue 6).

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
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .data.toy import TEACHER_NIAH_TASKS, TEACHERS, TOY_TRAIN_LEN
from .errors import UserError

# The needle tasks behind `eval/<model>/niah/<length>`: one number retrieved by a word key from a repetitive (noise) or a
# varied (essay) haystack (RULER's S-NIAH 1 and 2): what the toy teachers learn (data.toy.TEACHER_NIAH_TASKS).
# Every task's score is logged on its own as well.
NIAH_TASKS = TEACHER_NIAH_TASKS
DEFAULT_OUT = "runs/demo"


@dataclass
class DemoSettings:
    """The quickstart notebook's parameters (defaults = the full demo). See the notebook for each one's help.
    The distillation is recipes/demo.yaml (with recipes/demo-quick.overrides.yaml when `quick`), then `seed`,
    `world_seed`, the output folder and `overrides`: any recipe field, checked by the recipe checker."""

    run_id: str = ""  # MLflow run to log into (set by hylo-lab sweep); "" = a new run
    parent_run_id: str = ""  # the sweep's parent run
    experiment: str = "quickstart"  # MLflow experiment
    tracking_uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite ./mlflow.db
    seed: int = 0  # the student's init, data order and evaluation samples (the recipe's seed)
    world_seed: int = 0  # the toy world and its teacher ladder (trained once, cached, shared by every `seed`)
    quick: bool = False  # the quick recipe (tiny teachers, few steps): every step in about a minute (CI)
    overrides: str = ""  # recipe fields, "stages.kd-long.steps=300; student.layout=2MLA2M2" (distill.stages)
    yarn_eval: str = "fixed"  # the hybrid's MLA factor at evaluation: fixed = the training one; cover = yarn_factor_at
    eval_samples: int = 32  # NIAH samples per task, length and seed, the same samples for every model
    long_eval_samples: int = 8  # the plain teacher beyond 4x (a bar, "below 0.20", not a comparison)
    eval_lengths: str = "256,512,1024,2048,4096,8192"  # context lengths of the evaluation
    ppl_tokens: int = 32768  # held-out tokens of the perplexity
    out_dir: str = ""  # where models, tables and figures go ("" = runs/demo)

    def __post_init__(self):
        from .config import parse_list

        problems = []
        if self.yarn_eval not in YARN_EVAL:
            problems.append(f"yarn_eval={self.yarn_eval!r}: choose one of {', '.join(YARN_EVAL)}")
        for name in ("eval_samples", "long_eval_samples", "world_seed", "seed", "ppl_tokens"):
            value, low = getattr(self, name), 0 if name in ("world_seed", "seed") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                problems.append(f"{name}={value!r} must be an integer >= {low}")
        try:
            lengths = parse_list(self.eval_lengths, int)
            if not lengths or any(n < 64 for n in lengths):
                problems.append(f"eval_lengths={self.eval_lengths!r}: give lengths >= 64 tokens")
        except ValueError:
            problems.append(f"eval_lengths={self.eval_lengths!r}: expected comma-separated integers like '256,512'")
        if not problems:
            try:
                self.recipe = build_recipe(self)
                self.mixers
            except (UserError, ValueError) as exc:
                problems.append(str(exc).replace("\n  - ", "; ").replace(":;", ":"))
        if problems:
            raise UserError("demo settings are invalid: " + "; ".join(problems))

    @property
    def lengths(self) -> list[int]:
        from .config import parse_list

        return sorted(set(parse_list(self.eval_lengths, int)))

    @property
    def base(self) -> str:
        """The toy teacher that is upcycled (stage 1's teacher too, and the teacher the demo evaluates)."""
        return self.recipe["base"].removeprefix("toy:")

    @property
    def teachers(self) -> tuple[str, ...]:
        """The toy teachers the recipe reads: the base, then the stage-2 teacher."""
        names = [self.recipe["base"], self.recipe.get("teacher") or self.recipe["base"]]
        return tuple(dict.fromkeys(n.removeprefix("toy:") for n in names))

    @property
    def student_layout(self) -> str:
        return self.recipe["student"]["layout"]

    @property
    def mixers(self) -> list[str]:
        from .config import parse_layout
        from .mixers import MIXERS

        student = self.recipe["student"]
        n_layers = TEACHERS[self.base]["num_hidden_layers"]  # quick teachers keep the layer count
        mixers = parse_layout(student.get("layout"), n_layers, student.get("mla_layers"))
        if any(m != "mla" and not MIXERS[m].linear for m in mixers):
            raise ValueError(f"student.layout={student.get('layout')!r}: the demo's student has MLA and linear "
                             "blocks only")
        if "mla" not in mixers or all(m == "mla" for m in mixers):
            raise ValueError(f"student.layout={student.get('layout')!r}: the hybrid needs at least one MLA and "
                             "one linear layer")
        return mixers

    @property
    def yarn(self):
        """The YarnSpec of the last stage (the one the hybrid leaves training with), None without YaRN."""
        from .distill.stages import YarnSpec

        spec = self.recipe["stages"][-1].get("yarn")
        return YarnSpec(**spec) if spec else None

    @property
    def yarn_factor(self) -> float:
        return float(self.yarn.factor) if self.yarn else 0.0

    @property
    def folder(self) -> Path:
        return Path(self.out_dir or DEFAULT_OUT)

    @property
    def eval_seed(self) -> int:
        """First sample seed of the NIAH evaluation: every model of one run sees the same samples."""
        return 1000 + self.seed

    def niah_samples(self, model: str, length: int) -> int:
        """Samples per NIAH task at `length` for `model`: eval_samples, except the plain teacher beyond 4x its
        length (only the "below 0.20" bar is asked there: the first long_eval_samples of the same samples)."""
        if model == "teacher" and length > 4 * TOY_TRAIN_LEN:
            return min(self.long_eval_samples, self.eval_samples)
        return self.eval_samples

    @property
    def teacher_yarn_factor(self) -> float:
        """YaRN factor of the 'teacher with YaRN' baseline: the hybrid's, else enough for the longest length."""
        return self.yarn_factor or max(1.0, max(self.lengths) / TOY_TRAIN_LEN)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE = RECIPES / "demo.yaml"
QUICK_OVERRIDES = RECIPES / "demo-quick.overrides.yaml"
MEASURE_CACHE_UP_TO = 2048  # cache bytes are measured up to this many tokens, predicted beyond


def log(msg: str) -> None:
    """One progress line on stdout (stderr would show as an error in the executed notebook)."""
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# Typical seconds of each step on a 2-core CPU (full demo, toy world cached; quick demo): the overall estimate's prior.
STEPS_FULL = dict(start=5, world=30, teacher_check=10, distill=240, load=5, evaluate=180, report=5)
STEPS_QUICK = dict(start=5, world=10, teacher_check=2, distill=15, load=2, evaluate=20, report=5)


def step(settings: DemoSettings, name: str) -> None:
    """Marks the start of one step of the demo on its overall progress line (progress.Overall)."""
    overall = getattr(settings, "_overall", None)
    if overall is not None:
        overall.step(name)


# ---------------------------------------------------------------------------------------------------------------
# Set-up and tracking


def start(settings: DemoSettings):
    """Make the output folder and the MLflow run (the given run_id under a sweep); log the settings once.
    Returns the Tracker (inactive when MLflow is unreachable: the demo goes on without logging)."""
    from .progress import Overall, quiet_third_party
    from .tracking import Tracker, run_name

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
    from .data.toy import get_toy_world

    step(settings, "world")
    names = settings.teachers
    t0 = time.perf_counter()
    log(f"toy world with teachers {', '.join(names)} (cached after the first build)")
    world = get_toy_world(teachers=names, quick=settings.recipe["toy_world"]["quick"], seed=settings.world_seed)
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
    from .data.toy import niah_accuracy, perplexity, read_corpus, resolve_device, unigram_perplexity

    step(settings, "teacher_check")
    base = settings.base
    tok, model = world.tokenizer(), world.teacher(base).to(resolve_device())
    n = settings.niah_samples(base, TOY_TRAIN_LEN)
    acc = niah_accuracy(model, tok, lengths=(TOY_TRAIN_LEN,), num_samples=n, seed=settings.eval_seed, tasks=NIAH_TASKS)
    heldout, train = read_corpus(world.corpus_heldout), read_corpus(world.corpus_train)
    ppl = perplexity(model, tok, heldout[:200])
    uni = unigram_perplexity(tok, train[:3000], heldout[:200])
    per_task = acc[TOY_TRAIN_LEN]
    report = dict(niah=sum(per_task.values()) / len(per_task), niah_tasks=per_task, heldout_ppl=ppl, unigram_ppl=uni)
    log(f"teacher {base}: NIAH at {TOY_TRAIN_LEN} = {report['niah']:.2f} {per_task}; held-out ppl {ppl:.2f} "
        f"(unigram {uni:.1f})")
    return report  # single values: summarize() logs them with the run's summary


# ---------------------------------------------------------------------------------------------------------------
# Distillation


def build_recipe(settings: DemoSettings, world=None) -> dict:
    """The recipe (hylo_lab.distill) of these settings as a validated dict: recipes/demo.yaml, the quick overrides
    when `quick`, seed, world_seed and the output folder, then `settings.overrides`. Warns when the last stage
    trains beyond its YaRN range (original length x factor)."""
    import yaml

    from .distill.stages import apply_overrides, parse_overrides, read_recipe, recipe_from_dict

    quick = yaml.safe_load(QUICK_OVERRIDES.read_text()) if settings.quick else {}
    raw = read_recipe(RECIPE, quick)
    raw = apply_overrides(raw, {"seed": settings.seed, "toy_world.seed": settings.world_seed,
                                "output_dir": str(settings.folder / "distill")})
    if world is not None:
        raw["toy_world"]["root"] = str(world.root.parent)
    raw = apply_overrides(raw, parse_overrides(settings.overrides))
    if not str(raw.get("base", "")).startswith("toy:"):
        raise UserError(f"base={raw.get('base')!r}: the demo upcycles a toy teacher (toy:NAME)")
    recipe_from_dict(raw, source_file=None)
    last = raw["stages"][-1]
    yarn = last.get("yarn")
    if yarn and last["seq_len"] > yarn["original_max_position_embeddings"] * yarn["factor"]:
        warn_outside_yarn("trains", last["seq_len"], yarn["factor"])
    return raw


def distill(settings: DemoSettings, recipe: dict, tracker=None) -> Path:
    """Run the recipe into out_dir/distill (a previous demo's folder there is replaced); returns the final
    hybrid's folder. Training curves go to the demo's MLflow run."""
    from .distill.trainer import run_recipe

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
        from .tracking import flatten

        stages = {st["name"]: st for st in recipe["stages"]}
        active.log_params({f"recipe.{k}": v for k, v in flatten(dict(stages=stages, student=recipe["student"],
                                                                         data=recipe["data"])).items()})
    with contextlib.redirect_stderr(sys.stdout):  # its [distill] lines are progress, not errors, in the report
        summary = run_recipe(recipe, tracker=active)
    seconds = time.perf_counter() - t0
    log(f"distillation done in {seconds:.0f} s -> {summary['final_model']}")
    if active is not None:
        settings._seconds = dict(getattr(settings, "_seconds", {}), distill=seconds)
        active.set_tags({"final_model": summary["final_model"]})
    return Path(summary["final_model"])


# ---------------------------------------------------------------------------------------------------------------
# Models and evaluation


def load_models(settings: DemoSettings, world, hybrid_dir) -> dict:
    """{"teacher": the base teacher, "teacher_yarn": the same with YaRN on every layer, "hybrid": the result},
    in eval mode on the GPU when there is one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .eval import load_model

    from .distill.stages import YarnSpec

    step(settings, "load")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = world.teacher_dirs[settings.base]
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    factor = settings.teacher_yarn_factor
    config = AutoConfig.from_pretrained(path)
    yarn = YarnSpec(factor=factor, original_max_position_embeddings=TOY_TRAIN_LEN)
    config.rope_parameters = yarn.rope_parameters(config.rope_parameters.get("rope_theta", 1e4))
    config.max_position_embeddings = int(max(TOY_TRAIN_LEN * factor, max(settings.lengths)))
    teacher_yarn = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval().to(device)
    hybrid, _ = load_model(hybrid_dir, device=device, dtype=torch.float32)
    log(f"models on {device}: teacher {settings.base}, teacher + YaRN x{factor:g}, hybrid {settings.student_layout}")
    return dict(teacher=teacher, teacher_yarn=teacher_yarn, hybrid=hybrid)


# The YaRN convention of the paper (shared/docs/method.md sections 5 and 7; ablations/README.md): the MLA layers keep
# one original length (the toy teachers' 256) and a factor that covers the training length; the YaRN arm raises
# the factor at evaluation to cover each evaluated length.
YARN_EVAL = ("fixed", "cover")


def yarn_factor_at(settings: DemoSettings, model: str, length: int) -> float:
    """The YaRN factor `model` runs with at `length` (0 = no YaRN). teacher: none; teacher_yarn: its one factor;
    hybrid: f = yarn_factor when yarn_eval="fixed", else max(yarn_factor, length / 256) (YaRN starts at
    evaluation when yarn_factor = 0 and the length is beyond 256)."""
    if model == "teacher":
        return 0.0
    if model == "teacher_yarn":
        return settings.teacher_yarn_factor
    train = float(settings.yarn_factor)
    if settings.yarn_eval == "fixed":
        return train
    cover = max(train, length / TOY_TRAIN_LEN)
    return cover if (train or cover > 1) else 0.0


def warn_outside_yarn(what: str, length: int, factor: float) -> None:
    import warnings

    message = (f"the demo {what} {length} tokens, beyond YaRN's range {TOY_TRAIN_LEN} x {factor:g} = "
               f"{TOY_TRAIN_LEN * factor:g} (original length x factor)")
    log(f"warning: {message}")
    warnings.warn(message, stacklevel=2)


@contextlib.contextmanager
def mla_yarn(model, factor: float, length: int):
    """YaRN x`factor` over the original 256 tokens on the hybrid's MLA layers inside the block (nothing for
    factor 0); the RoPE it had is back afterwards."""
    if not factor:
        yield model
        return
    from .distill.kd import apply_yarn
    from .distill.stages import YarnSpec
    from .layers.common import mla_rotary

    config = model.config
    saved = dict(config.mla_rope_parameters), config.max_position_embeddings
    apply_yarn(model, YarnSpec(factor=float(factor), original_max_position_embeddings=TOY_TRAIN_LEN), length)
    device = next(model.parameters()).device
    model.model.rotary["mla"].to(device)
    try:
        yield model
    finally:
        config.mla_rope_parameters, config.max_position_embeddings = saved
        model.model.rotary["mla"] = mla_rotary(config).to(device)


def _heldout_stream(world, tokens: int) -> list[int]:
    from .data.toy import read_corpus

    tok = world.tokenizer()
    ids: list[int] = []
    for doc in read_corpus(world.corpus_heldout):
        ids += tok.encode(doc) + [tok.eos_token_id]
        if len(ids) >= tokens:
            break
    return ids[:tokens]


def evaluate_models(settings: DemoSettings, models: dict, world, tracker=None):
    """NIAH accuracy (NIAH_TASKS, settings.niah_samples(model, length) samples each at random needle depths from
    settings.eval_seed: the same samples for every model; with yarn_eval="cover" the hybrid's MLA factor is
    raised per length, yarn_factor_at), perplexity at the teachers' length on
    held-out text, and cache bytes of every model at every length (predicted by `predict_cache_bytes` in the
    model's dtype; measured after a prefill of random tokens up to `measure_cache_up_to`). Returns a
    DataFrame(model, length, niah, niah_low, niah_high, n, ppl, cache_bytes, cache_bytes_measured, ttft_s, and one
    column per NIAH task; niah_low/high: the Wilson 95% interval over the n samples evaluated, all tasks pooled)
    and logs the metric names listed in the module docstring."""
    import pandas as pd

    from .eval.efficiency import measure_efficiency, predict_cache_bytes
    from .eval.perplexity import run_perplexity
    from .eval.ruler import run_ruler
    from .stats import accuracy_ci

    step(settings, "evaluate")
    tok = world.tokenizer()
    lengths = settings.lengths
    short = TOY_TRAIN_LEN if TOY_TRAIN_LEN in lengths else min(lengths)
    stream = _heldout_stream(world, settings.ppl_tokens)
    active = tracker if tracker is not None and tracker.active else None
    rows, metrics = [], {}
    for label, model in models.items():
        t0 = time.perf_counter()
        niah, per_task, ci = {}, {}, {}
        for length in lengths:  # one call per length: batch as many samples as ~16K tokens allow
            n = settings.niah_samples(label, length)
            batch = max(1, min(n * len(NIAH_TASKS), 16384 // length))
            factor = yarn_factor_at(settings, label, length)
            if factor and length > TOY_TRAIN_LEN * factor:
                warn_outside_yarn(f"evaluates {label} at", length, factor)
            cover = label == "hybrid" and settings.yarn_eval == "cover"
            with mla_yarn(model, factor, length) if cover else contextlib.nullcontext():
                res = run_ruler(model, tok, [length], tasks=NIAH_TASKS, num_samples=n, seed=settings.eval_seed,
                                batch_size=batch, prefill_chunk=2048,
                                out_dir=settings.folder / "eval" / f"niah_{label}" / str(length))
            niah[length] = float(res["average"].average.iloc[0])
            ok = res["table"][res["table"].status == "ok"]
            per_task[length] = dict(zip(ok.task, ok.score))
            ci[length] = accuracy_ci(int(round(float((ok.score * ok.n).sum()))), int(ok.n.sum()))
            metrics.update({f"eval/{label}/niah/{length}/{task}": v for task, v in per_task[length].items()})
        t_niah = time.perf_counter() - t0
        ppl = run_perplexity(model, stream, [short], batch_size=8)["by_length"].set_index("length")["ppl"]
        measured = [n for n in lengths if n <= MEASURE_CACHE_UP_TO] or lengths[:1]
        eff = {r["length"]: r for r in measure_efficiency(model, measured, prefill_chunk=2048, decode_tokens=1,
                                                           warmup=False)}
        dtype = next(model.parameters()).dtype
        for length in lengths:
            e = eff.get(length, {})
            predicted = predict_cache_bytes(model.config, length, dtype=dtype)["predicted"]
            rows.append(dict(model=label, length=length, niah=niah[length], niah_low=ci[length]["low"],
                             niah_high=ci[length]["high"], n=ci[length]["n"], ppl=float(ppl.get(length, math.nan)),
                             cache_bytes=predicted, cache_bytes_measured=e.get("cache_bytes_measured"),
                             ttft_s=e.get("ttft_s"), **per_task[length]))
            metrics[f"eval/{label}/niah/{length}"] = niah[length]
            metrics[f"eval/{label}/cache_bytes/{length}"] = predicted
            if e.get("cache_bytes_measured") is not None:
                metrics[f"eval/{label}/cache_bytes_measured/{length}"] = e["cache_bytes_measured"]
        metrics[f"eval/{label}/ppl/{short}"] = float(ppl[short])
        settings._seconds = dict(getattr(settings, "_seconds", {}), **{f"eval_{label}": time.perf_counter() - t0})
        log(f"{label}: NIAH " + ", ".join(f"{k}: {v:.2f}" for k, v in niah.items())
            + f" | ppl@{short} {float(ppl[short]):.3f} | {time.perf_counter() - t0:.0f} s (NIAH {t_niah:.0f} s)")
    frame = pd.DataFrame(rows)
    frame.to_csv(settings.folder / "results.csv", index=False)
    if active is not None:
        active.log_metrics(metrics)
        active.log_artifact(settings.folder / "results.csv", "tables")
    return frame


# ---------------------------------------------------------------------------------------------------------------
# Figures and the summary


def model_labels(settings: DemoSettings) -> dict:
    """How the figures and the report name the demo's models: the hybrid with its layout."""
    base = settings.base
    return dict(teacher=f"teacher {base}", teacher_yarn=f"teacher {base} + YaRN x{settings.teacher_yarn_factor:g}",
                hybrid=f"hybrid {settings.student_layout}")


def figures(settings: DemoSettings, results, tracker=None) -> dict:
    """The report's figures in the house style (hylo_lab.plots), saved to figures/ and logged:
    niah_vs_length (Wilson intervals over the samples evaluated, the 0.8 goal) and cache_vs_length (teacher vs
    hybrid, measured filled, predicted hollow, the ratio at the longest length)."""
    from .plots import cache_curve, context_curve

    labels = model_labels(settings)
    figs = dict(
        niah_vs_length=context_curve(results, train_len=TOY_TRAIN_LEN, labels=labels, bar=0.8,
                                     title="Needle retrieval beyond the training length"),
        cache_vs_length=cache_curve(results[results.model.isin(["teacher", "hybrid"])], train_len=TOY_TRAIN_LEN,
                                    labels=labels, title="Cache after the prompt (filled: measured, hollow: predicted)"),
    )
    for name, fig in figs.items():
        save_figure(settings, fig, name, tracker)
    return figs


def show_figure(settings: DemoSettings, name: str):
    """figures/<name>.png as an image the notebook (and its HTML) embeds."""
    from IPython.display import Image

    return Image(filename=str(settings.folder / "figures" / f"{name}.png"))


def save_figure(settings: DemoSettings, fig, name: str, tracker=None) -> Path:
    path = settings.folder / "figures" / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    if tracker is not None:
        tracker.log_artifact(path, "figures")
    return path


def summarize(settings: DemoSettings, results, teacher_report: dict | None = None, tracker=None) -> dict:
    """The numbers the demo must show, from the results table, as a dict: the run's summary (tables/summary.json
    and `summary.*` tags in MLflow) and summary.json in the output folder, which holds no absolute path."""
    step(settings, "report")
    pivot = results.pivot_table(index="length", columns="model", values="niah", sort=True)
    longest = max(settings.lengths)
    beyond = [n for n in settings.lengths if n > 4 * TOY_TRAIN_LEN]
    short = TOY_TRAIN_LEN if TOY_TRAIN_LEN in settings.lengths else min(settings.lengths)
    ppl = results[results.length == short].set_index("model")["ppl"]
    cache = results[results.length == longest].set_index("model")["cache_bytes"].astype(float)
    out = dict(
        quick=settings.quick,
        teacher_niah_1x=float(pivot.loc[short, "teacher"]),
        hybrid_niah_longest=float(pivot.loc[longest, "hybrid"]),
        longest=longest,
        longest_multiple=longest / TOY_TRAIN_LEN,
        teacher_niah_beyond_4x_max=float(pivot.loc[beyond, "teacher"].max()) if beyond else math.nan,
        teacher_yarn_niah_beyond_4x_max=float(pivot.loc[beyond, "teacher_yarn"].max()) if beyond else math.nan,
        teacher_ppl=float(ppl["teacher"]),
        hybrid_ppl=float(ppl["hybrid"]),
        ppl_ratio=float(ppl["hybrid"] / ppl["teacher"]),
        cache_ratio_longest=float(cache["hybrid"] / cache["teacher"]),
        seconds=time.perf_counter() - getattr(settings, "_t0", time.perf_counter()),
    )
    if teacher_report:
        out["teacher_check_niah"] = teacher_report["niah"]
        out["teacher_check_ppl_vs_unigram"] = teacher_report["heldout_ppl"] / teacher_report["unigram_ppl"]
    out["goals"] = dict(
        teacher_niah_1x_ge_95=out["teacher_niah_1x"] >= 0.95,
        hybrid_niah_32x_ge_80=out["hybrid_niah_longest"] >= 0.8 and out["longest_multiple"] >= 32,
        teachers_below_20_beyond_4x=bool(beyond) and max(out["teacher_niah_beyond_4x_max"],
                                                         out["teacher_yarn_niah_beyond_4x_max"]) < 0.2,
        ppl_within_10pct=out["ppl_ratio"] <= 1.10,
    )
    out["seconds_by_step"] = dict(getattr(settings, "_seconds", {}))
    out["teachers"] = dict(getattr(settings, "_teachers", {}))
    if tracker is not None and tracker.active:
        out.update(run_id=tracker.run_id, tracking_uri=relative_uri(tracker.tracking_uri),
                   experiment=settings.experiment, run_url=tracker.url())
    (settings.folder / "summary.json").write_text(json.dumps(out, indent=2))
    if tracker is not None and tracker.active:
        tracker.log_summary({k: v for k, v in out.items() if k not in ("run_id", "tracking_uri", "run_url")})
    log(f"done in {out['seconds']:.0f} s; goals: {out['goals']}")
    return out


def relative_uri(uri: str) -> str:
    """sqlite:////abs/cwd/mlflow.db -> sqlite:///mlflow.db (relative to the working folder); other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            return prefix + str(path.relative_to(Path.cwd()))
    return uri


# Each goal: what it asks, in words (the report's goals table).
GOALS = dict(
    teacher_niah_1x_ge_95="the teacher retrieves the needle at its training length (NIAH >= 0.95 at 1x)",
    hybrid_niah_32x_ge_80="the hybrid retrieves it at 32x the teacher's training length (NIAH >= 0.80)",
    teachers_below_20_beyond_4x="the teacher, with or without YaRN, fails beyond 4x (NIAH < 0.20)",
    ppl_within_10pct="the hybrid's short-context perplexity is within 10% of the teacher's",
)
QUESTION = ("Does the HyLo recipe (upcycle a Transformer into MLA + linear layers, distil it with YaRN on the MLA "
            "layers) give a hybrid that retrieves a needle far beyond its teacher's training length, with a much "
            "smaller cache, at no cost in short-context perplexity?")


def conclusion(summary: dict, layout: str = "the hybrid") -> str:
    """A few sentences written from the numbers of `summary` (what summarize returns)."""
    s, goals = summary, summary["goals"]
    met = sum(bool(v) for v in goals.values())
    longest = f"{s['longest']} tokens ({s['longest_multiple']:g}x the training length)"
    parts = [f"Hybrid {layout}: NIAH {s['hybrid_niah_longest']:.2f} at {longest}, with "
             f"{s['cache_ratio_longest']:.2f}x the teacher's cache there and {s['ppl_ratio']:.2f}x its "
             f"short-context perplexity."]
    if not math.isnan(s.get("teacher_niah_beyond_4x_max", math.nan)):
        parts.append(f"Beyond 4x the teacher reaches at most {s['teacher_niah_beyond_4x_max']:.2f} "
                     f"({s['teacher_yarn_niah_beyond_4x_max']:.2f} with YaRN).")
    parts.append(f"{met} of {len(goals)} goals met" + (" (quick run: untrained toy models, the numbers only show "
                                                         "that every step runs)." if s["quick"] else "."))
    return " ".join(parts)


def report(summary: dict, settings: DemoSettings | None = None):
    """The head of the report (a Markdown display): the question, the headline, the goals table, the conclusion."""
    from IPython.display import Markdown

    layout = settings.student_layout if settings is not None else "the hybrid"
    s = summary
    headline = (f"**Headline.** NIAH **{s['hybrid_niah_longest']:.2f}** at {s['longest_multiple']:g}x the training "
                f"length for the hybrid {layout}, vs {s['teacher_niah_1x']:.2f} for the teacher at 1x; cache "
                f"**{s['cache_ratio_longest']:.2f}x** the teacher's; perplexity ratio {s['ppl_ratio']:.2f}.")
    rows = ["| goal | met |", "|---|---|"] + [f"| {GOALS.get(k, k)} | {'yes' if v else 'no'} |"
                                             for k, v in s["goals"].items()]
    took = f"Run took {s['seconds'] / 60:.1f} min" + (f"; MLflow run: {s['run_url']}" if s.get("run_url") else "")
    return Markdown("\n\n".join(["## Results", f"**Question.** {QUESTION}", headline, "\n".join(rows),
                                   f"**Conclusion.** {conclusion(s, layout)}", took]))


def summary_table(results):
    """NIAH / ppl / cache (KiB) per model and length, as printed by `hylo-lab demo`."""
    import pandas as pd

    niah = results.pivot_table(index="model", columns="length", values="niah", sort=False)
    niah.index = [f"NIAH {m}" for m in niah.index]
    cache = results.pivot_table(index="model", columns="length", values="cache_bytes", sort=False) / 1024
    cache = cache.loc[[m for m in ("teacher", "hybrid") if m in cache.index]]
    cache.index = [f"cache KiB {m}" for m in cache.index]
    table = pd.concat([niah.round(2), cache.round(0)])
    table.columns = [str(c) for c in table.columns]
    return table


def finish(settings: DemoSettings, tracker=None) -> None:
    if tracker is not None and not settings.run_id:  # a sweep ends the runs it created itself
        tracker.end()
    overall = getattr(settings, "_overall", None)
    if overall is not None:
        overall.done()
    if tracker is not None and tracker.active:
        log(f"MLflow run: {tracker.url()}")


# ---------------------------------------------------------------------------------------------------------------
# `hylo-lab demo`: execute the notebook


def notebook_path() -> Path:
    """notebooks/00_quickstart.ipynb of this checkout."""
    path = Path(__file__).resolve().parent.parent / "notebooks" / "00_quickstart.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"the quickstart notebook is missing: {path}")
    return path


def run_demo(*, quick: bool = False, linear: str = "gdn", out_dir=None, tracking_uri: str = "",
             experiment: str = "quickstart", extra: dict | None = None, echo=print) -> dict:
    """Execute notebooks/00_quickstart.ipynb with papermill into `out_dir` (default runs/demo, or runs/demo-quick),
    its output streamed to the terminal; then write its HTML next to it. Returns summary.json's content plus
    `notebook`, `html`, `figures` and `out_dir`. Bad settings or an unwritable `out_dir` raise UserError before
    anything runs; a second demo on the same folder is refused while one runs; the previous results are replaced
    only when the new run succeeded."""
    import logging

    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    from .outputs import check_writable, locked, staged

    out = Path(out_dir or (DEFAULT_OUT + ("-quick" if quick else ""))).resolve()
    params = dict(quick=quick, out_dir=str(out), experiment=experiment, tracking_uri=tracking_uri, **(extra or {}))
    if linear != "gdn":
        layout = with_linear(DemoSettings(**params).student_layout, linear)
        params["overrides"] = "; ".join(x for x in (params.get("overrides", ""), f"student.layout={layout}") if x)
    DemoSettings(**params)  # bad values fail here, before a kernel starts
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    check_writable(out, "--out")
    notebook = notebook_path()
    # The notebook's defaults are the quick run: the full demo passes the full values of what --quick changes.
    full = {k: DemoSettings.__dataclass_fields__[k].default for k in QUICK_PARAMETERS}
    params = dict(QUICK_PARAMETERS if quick else full) | params
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    t0 = time.perf_counter()
    # The notebook writes into a sibling folder that replaces `out` only when everything ran: until then (and after
    # a failure or a kill) the previous results stay as they were.
    with locked(out, "hylo-lab demo"), staged(out, whole=True) as tmp:
        params["out_dir"] = staging = str(tmp)
        executed = tmp / "00_quickstart.ipynb"
        echo(f"hylo-lab demo{' --quick' if quick else ''}: executing {notebook.name} -> {out / executed.name} "
             f"(written to {tmp.name} until it succeeds)")
        previous = os.environ.get("HYLO_LAB_PROGRESS")
        os.environ["HYLO_LAB_PROGRESS"] = "lines"  # the kernel's bars: a few lines each, not one per refresh
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=params, kernel_name="python3",
                                       log_output=True, progress_bar=False, cwd=str(Path.cwd()))
        finally:
            if previous is None:
                os.environ.pop("HYLO_LAB_PROGRESS", None)
            else:
                os.environ["HYLO_LAB_PROGRESS"] = previous
        nb = report_first(nbformat.read(str(executed), as_version=4))
        nbformat.write(nb, str(executed))
        html, _ = HTMLExporter().from_notebook_node(nb)
        (tmp / "00_quickstart.html").write_text(html, encoding="utf-8")
        summary = json.loads((tmp / "summary.json").read_text())
    executed, html_path = out / "00_quickstart.ipynb", out / "00_quickstart.html"
    if summary.get("run_id"):
        from .tracking import Tracker

        tracker = Tracker(summary["experiment"], tracking_uri=summary["tracking_uri"], run_id=summary["run_id"])
        tracker.log_artifact(executed, "notebook")
        tracker.log_artifact(html_path, "notebook")
        tracker.set_tags({k: v.replace(staging, str(out)) for k, v in tracker.get_tags().items() if staging in v})
    summary.update(notebook=str(executed), html=str(html_path), out_dir=str(out),
                   figures=sorted(str(p) for p in (out / "figures").glob("*.png")),
                   wall_seconds=time.perf_counter() - t0)
    return summary


def report_first(nb):
    """The executed notebook as a report: the cells tagged `report` (results, conclusion, figures) right after the
    opening markdown cell, then a "Details" heading and every other cell in the order it ran."""
    import nbformat

    lead = [c for c in nb.cells if "report" in c.metadata.get("tags", [])]
    rest = [c for c in nb.cells if c not in lead]
    head = rest[:1] if rest and rest[0].cell_type == "markdown" else []
    details = nbformat.v4.new_markdown_cell("## Details\nEvery step as it ran: settings, the toy world, "
                                            "distillation, evaluation.")
    nb.cells = head + lead + [details] + rest[len(head):]
    return nb


def _shown(path) -> str:
    """`path` relative to the working folder where it lies inside it."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else str(path)


# What --quick changes: the quick recipe, two lengths, few evaluation samples and perplexity tokens.
QUICK_PARAMETERS = dict(quick=True, eval_samples=2, ppl_tokens=2048, eval_lengths="256,512")


def with_linear(layout: str, linear: str) -> str:
    """The layout with every linear block replaced by `linear`: ('2MLA2GDN', 'mamba2') -> '2MLA2M2'."""
    from .config import layout_parts
    from .mixers import MIXERS, linear_mixers

    if linear not in linear_mixers():
        raise UserError(f"linear={linear!r}: choose one of {', '.join(linear_mixers())}")
    return "".join(f"{n}{MIXERS[linear if MIXERS[m].linear else m].code}" for n, m in layout_parts(layout))


def report_text(summary: dict) -> str:
    import pandas as pd

    results = pd.read_csv(Path(summary["out_dir"]) / "results.csv")
    lines = [summary_table(results).to_string(), ""]
    lines.append(f"short-context perplexity: teacher {summary['teacher_ppl']:.3f}, hybrid {summary['hybrid_ppl']:.3f} "
                 f"(ratio {summary['ppl_ratio']:.3f}); cache at {summary['longest']} tokens: hybrid / teacher = "
                 f"{summary['cache_ratio_longest']:.3f}")
    lines.append("goals: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in summary["goals"].items()))
    lines += ["", conclusion(summary), "", f"report:   {_shown(summary['html'])} (open it in a browser)",
              f"notebook: {_shown(summary['notebook'])}",
              "figures:  " + ", ".join(_shown(f) for f in summary["figures"]),
              f"took {summary['wall_seconds'] / 60:.1f} min"]
    if summary.get("run_url"):
        lines.append(f"MLflow run: {summary['run_url']} (`make mlflow-ui` serves it)")
    return "\n".join(lines)
