"""The quickstart's settings (`DemoSettings`, exactly the notebook's parameters) and the recipe they build:
recipes/demo.yaml, the quick overrides, then dotted overrides, checked by the recipe checker; the YaRN factor each
model runs with at each evaluated length.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ..data.toy import TEACHER_NIAH_TASKS, TEACHERS, TOY_TRAIN_LEN
from ..errors import UserError


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
    tracking_uri: str = ""  # "" = tracking.default_tracking_uri()
    seed: int = 0  # the student's init, data order and evaluation samples (the recipe's seed)
    world_seed: int = 0  # the toy world and its teacher ladder (trained once, cached, shared by every `seed`)
    quick: bool = False  # the quick recipe (tiny teachers, few steps): every step in about a minute (CI)
    overrides: str = ""  # recipe fields, "stages.kd-long.steps=300; student.layout=2MLA2M2" (distill.stages)
    yarn_eval: str = "fixed"  # the hybrid's MLA factor at evaluation: fixed = the training one; cover = yarn_factor_at
    eval_samples: int = -1  # NIAH samples per task, length and seed, the same samples for every model (-1: by quick)
    long_eval_samples: int = 8  # the plain teacher beyond 4x (a bar, "below 0.20", not a comparison)
    eval_lengths: str = ""  # context lengths of the evaluation ("": by quick)
    ppl_tokens: int = -1  # held-out tokens of the perplexity (-1: by quick)
    out_dir: str = ""  # where models, tables and figures go ("" = runs/demo)

    def __post_init__(self):
        from ..config import parse_list

        for name, value in EVAL_DEFAULTS[self.quick is True].items():  # unset: what `quick` implies
            if getattr(self, name) in (-1, ""):
                setattr(self, name, value)
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
        from ..config import parse_list

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
        from ..config import parse_layout
        from ..mixers import MIXERS

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
        from ..distill.stages import YarnSpec

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
        """First sample seed of the NIAH evaluation: every model of one run sees the same samples, and runs of
        different seeds see disjoint ones (a run draws seeds eval_seed .. eval_seed + eval_samples - 1)."""
        return 1000 + EVAL_SEED_STRIDE * self.seed

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


RECIPES = Path(__file__).resolve().parents[2] / "recipes"
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


def build_recipe(settings: DemoSettings, world=None) -> dict:
    """The recipe (hylo_lab.distill) of these settings as a validated dict: recipes/demo.yaml, the quick overrides
    when `quick`, seed, world_seed and the output folder, then `settings.overrides`. Warns when the last stage
    trains beyond its YaRN range (original length x factor)."""
    import yaml

    from ..distill.stages import apply_overrides, parse_overrides, read_recipe, recipe_from_dict

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


# What --quick changes: the quick recipe, two lengths, few evaluation samples and perplexity tokens.
# The evaluation a run gets when its settings leave it unset (-1 or ""): the full demo's, or the quick run's, so
# `quick: false` alone (a sweep, the CLI) is the full demo everywhere.
EVAL_DEFAULTS = {False: dict(eval_samples=32, eval_lengths="256,512,1024,2048,4096,8192", ppl_tokens=32768),
                 True: dict(eval_samples=2, eval_lengths="256,512", ppl_tokens=2048)}
QUICK_PARAMETERS = dict(quick=True)
EVAL_SEED_STRIDE = 100_000  # more samples per task than any run draws


def with_linear(layout: str, linear: str) -> str:
    """The layout with every linear block replaced by `linear`: ('2MLA2GDN', 'mamba2') -> '2MLA2M2'."""
    from ..config import layout_parts
    from ..mixers import MIXERS, linear_mixers

    if linear not in linear_mixers():
        raise UserError(f"linear={linear!r}: choose one of {', '.join(linear_mixers())}")
    return "".join(f"{n}{MIXERS[linear if MIXERS[m].linear else m].code}" for n, m in layout_parts(layout))
