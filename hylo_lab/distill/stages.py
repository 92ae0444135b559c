"""Distillation recipes: YAML -> validated dataclasses, checked before any model is loaded.

A recipe names the base model, the student's layout, the data, the loop settings and an ordered list of
stages. Stage kinds (method.md section 5):
- "ild": Enhanced-ILD. The all-MLA and the all-linear students (upcycled from the base) are trained one
  after the other against the base with teacher forcing; the hybrid is then assembled by the layout.
  Consecutive ild stages continue both students; ild stages come before every kd stage.
- "kd": knowledge distillation of the hybrid against `teacher` (default: the base), optionally with YaRN
  applied to the MLA layers first. Each stage starts from the previous stage's result.

Example (recipes/toy.yaml is a complete one):

    name: toy-1mla3gdn
    output_dir: runs/toy-1mla3gdn
    base: toy:llama-s                 # a directory, a hub id, or toy:NAME (a toy-world teacher)
    teacher: toy:llama-m              # stage-2 teacher; must share the base's tokenizer
    student: {layout: 1MLA3GDN, mla_layers: [1]}
    data:
      train: [{type: toy, split: train}]
      heldout: [{type: toy, split: heldout}]
    train: {batch_size: 8, micro_batch_size: 8, eval_every: 20}
    stages:
      - {name: ild, kind: ild, seq_len: 256, steps: 60, lr: 2.0e-4}
      - {name: kd-256, kind: kd, seq_len: 256, steps: 60, lr: 6.0e-5}
      - {name: kd-1k, kind: kd, seq_len: 1024, steps: 30, lr: 6.0e-5,
         yarn: {factor: 4, original_max_position_embeddings: 256}}

Paths (base, teacher, tokenizer, data) are taken relative to the working directory; `~` and `$VARS` are
expanded. Every problem found is reported at once (`RecipeError`), unknown keys with the closest known one.
Here: the specs and dict -> dataclasses; dotted overrides in overrides.py; the value and path checks in
recipe_check.py.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..data.packing import SyntheticSpec
from ..data.sources import SourceSpec
from .overrides import apply_overrides, format_overrides, parse_overrides  # noqa: F401 (the recipe API)
from .recipe_check import (BASE_SHAPE_KEYS, DEVICES, KL_IMPLS, PRECISIONS, STAGE_KINDS,  # noqa: F401
                           TEACHER_DTYPES, RecipeError, expand, validate)


@dataclass
class YarnSpec:
    """YaRN on the MLA layers' RoPE (transformers' "yarn" rope type; method.md section 5)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None

    def rope_parameters(self, rope_theta: float) -> dict:
        params = dict(rope_type="yarn", rope_theta=float(rope_theta), factor=float(self.factor),
                      original_max_position_embeddings=int(self.original_max_position_embeddings))
        for k in ("beta_fast", "beta_slow", "attention_factor"):
            if getattr(self, k) is not None:
                params[k] = float(getattr(self, k))
        return params


@dataclass
class StudentSpec:
    """How the student is made: upcycled from the base by a layout, or loaded from `init`."""

    layout: str | None = None  # "4MLA12GDN", placed by mla_layers / select, or the preset's
    mla_layers: list[int] | None = None
    select: str | None = None  # uniform | smart (smart: scored on calibration rows of the training data)
    preset: str | None = None  # "llama3.2-1b/4MLA12GDN": the paper's layers and MLA / GDN dims
    linear: str | None = None  # gdn | mamba2, when only mla_layers are given
    init: str | None = None  # a saved HyLo model directory to start from instead (no ild stage then)
    upcycle: dict = field(default_factory=dict)  # further upcycle() options: rope_init, qk_norm, dims, chunk_size, ...
    calibration_rows: int = 4  # rows of the first stage's length for select=smart


@dataclass
class DataSpec:
    train: list[SourceSpec] = field(default_factory=list)
    heldout: list[SourceSpec] = field(default_factory=list)  # [] = no held-out evaluation
    synthetic: SyntheticSpec | None = None


@dataclass
class TrainSpec:
    """Loop settings shared by every stage (a stage may override batch sizes and checkpointing)."""

    batch_size: int = 8  # rows per optimizer step, all processes together
    micro_batch_size: int | None = None  # rows per forward per process; None = batch_size / processes
    lr_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (the paper states none)
    weight_decay: float = 0.0  # on >= 2-D parameters only
    eps: float = 1e-8
    clip: float = 1.0  # max global grad norm; 0 = off
    precision: str = "auto"  # auto: bf16 autocast on GPU, float32 on CPU | bf16 | fp32
    teacher_dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    activation_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda (under `accelerate launch` the launcher decides)
    checkpoint_every: int = 0  # steps; 0 = only at the end of each stage
    keep_checkpoints: int = 1
    eval_every: int = 0  # steps; 0 = only before and after each stage
    eval_rows: int = 8  # held-out rows per evaluation
    log_every: int = 1
    progress: bool = True


@dataclass
class StageSpec:
    name: str
    kind: str
    seq_len: int
    steps: int | None = None
    tokens: float | None = None  # alternative to steps: ceil(tokens / (batch_size * seq_len)) steps
    lr: float = 1e-4
    warmup: float = 0.01  # fraction of the stage's steps with linear warmup
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    batch_size: int | None = None  # None: train.batch_size
    micro_batch_size: int | None = None
    activation_checkpointing: bool | None = None
    # ild
    mixer_weight: float = 1.0  # 0 = plain ILD (layer outputs only)
    squared: bool = False  # ||.||_2^2 instead of ||.||_2
    # kd
    kl: str = "full"  # full (T x V logits) | chunked (token chunks) | hidden (logit-free tiles) | topk
    direction: str = "forward"  # forward = KL(teacher || student) | reverse
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # next-token cross-entropy on the data (the paper: 0)
    kl_chunk_size: int = 4096  # tokens per chunk (chunked, hidden)
    vocab_chunk_size: int = 8192  # vocabulary tile (hidden)
    kl_backend: str = "auto"  # hidden: auto | torch | fla
    teacher_topk: int = 64  # topk: the teacher's k most likely next tokens per position (losses.topk_kd_loss)
    teacher_cache: str | None = None  # topk: a folder for those targets, reused by later epochs (teacher_cache.py)
    yarn: YarnSpec | None = None  # applied to the MLA layers before this stage; None keeps the current RoPE
    synthetic_fraction: float | None = None  # None: data.synthetic.fraction

    def num_steps(self, batch_size: int) -> int:
        if self.steps is not None:
            return int(self.steps)
        return max(1, math.ceil(float(self.tokens) / (batch_size * self.seq_len)))


@dataclass
class TrackingSpec:
    enabled: bool = True
    experiment: str = "hylo_lab-distill"
    tracking_uri: str | None = None  # None: tracking.default_tracking_uri()
    run_name: str | None = None  # None: the recipe's name
    log_model_max_mb: float = 200.0  # the final model's files become artifacts when smaller; else only its path


@dataclass
class ToyWorldSpec:
    root: str | None = None  # None: $HYLO_LAB_HOME or ~/.cache/hylo_lab
    quick: bool = False
    seed: int = 0
    digit_group: int = 1  # the tokenizer splits numbers into single digits (1) or pairs (2)
    training: dict = field(default_factory=dict)  # train_teacher keywords over each teacher's defaults


@dataclass
class Recipe:
    name: str
    output_dir: str
    base: str
    stages: list[StageSpec]
    data: DataSpec
    student: StudentSpec = field(default_factory=StudentSpec)
    teacher: str | None = None  # stage-2 teacher; None = the base
    tokenizer: str | None = None  # None = the base's
    seed: int = 0
    train: TrainSpec = field(default_factory=TrainSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    toy_world: ToyWorldSpec = field(default_factory=ToyWorldSpec)
    source_file: str | None = None  # the YAML file it was read from (set by load_recipe)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stage_batch(self, stage: StageSpec) -> tuple[int, int | None]:
        return (stage.batch_size or self.train.batch_size,
                stage.micro_batch_size or (None if stage.batch_size else self.train.micro_batch_size))

    def uses_toy(self) -> bool:
        names = [self.base, self.teacher, self.tokenizer]
        return any(isinstance(n, str) and n.startswith("toy:") for n in names) or any(
            s.type == "toy" for s in self.data.train + self.data.heldout)

    @property
    def teacher_name(self) -> str:
        return self.teacher or self.base


_NESTED = {"student": StudentSpec, "data": DataSpec, "train": TrainSpec, "tracking": TrackingSpec,
           "toy_world": ToyWorldSpec}


def _build(cls, raw, where: str, errors: list[str], **fixed):
    """cls(**raw) with unknown keys reported (closest known key suggested); None when it cannot be built."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping, got {type(raw).__name__} {raw!r}")
        return None
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source_file"]
    ok = True
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(names)})"
            errors.append(f"{where}: unknown key {key!r}{hint}")
            ok = False
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for key in required:
        if key not in raw and key not in fixed:
            errors.append(f"{where}: missing required key {key!r}")
            ok = False
    if not ok:
        return None
    raw = {k: _coerce(cls, k, v) for k, v in raw.items()}
    for key, value in raw.items():
        problem = _type_problem(cls.__dataclass_fields__[key].type, value)
        if problem:
            errors.append(f"{where}.{key}: {problem}")
            ok = False
    if not ok:
        return None
    try:
        return cls(**{**raw, **fixed})
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: {exc}")
        return None


def _coerce(cls, key, value):
    """'2e-4' -> 2e-4 for number fields: YAML 1.1 reads exponents without a dot ('2e-4', '1e9') as strings."""
    kind = str(cls.__dataclass_fields__[key].type)
    if isinstance(value, str) and ("float" in kind or "int" in kind) and "str" not in kind:
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if "int" in kind and "float" not in kind and number == int(number) else number
    return value


_TYPE_CHECKS = {"bool": (lambda v: isinstance(v, bool), "true or false"),
                "int": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "an integer"),
                "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
                "str": (lambda v: isinstance(v, str), "a string"),
                "list": (lambda v: isinstance(v, (list, tuple)), "a list"),
                "dict": (lambda v: isinstance(v, dict), "a mapping"),
                "None": (lambda v: v is None, "null")}


def _type_problem(annotation, value) -> str | None:
    """What is wrong with `value` for a field annotated `annotation` ("bool", "int | None", ...), or None.
    Annotations naming other types (nested specs) are checked where those are built."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    alternatives = [a.strip().split("[")[0] for a in text.replace("typing.", "").split("|")]
    if not all(a in _TYPE_CHECKS for a in alternatives):
        return None
    if any(_TYPE_CHECKS[a][0](value) for a in alternatives):
        return None
    wanted = " or ".join(_TYPE_CHECKS[a][1] for a in alternatives)
    got = f"the string {value!r}" if isinstance(value, str) else f"{type(value).__name__} {value!r}"
    hint = " (write it without quotes)" if isinstance(value, str) and "bool" in alternatives and value.lower() in (
        "true", "false", "yes", "no", "on", "off") else ""
    return f"expected {wanted}, got {got}{hint}"


def _sources(raw, where: str, errors: list[str]) -> list[SourceSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.append(f"{where}: expected a list of sources, got {type(raw).__name__}")
        return []
    out = []
    for i, item in enumerate(raw):
        spec = _build(SourceSpec, item, f"{where}[{i}]", errors)
        if spec is not None:
            out.append(spec)
    return out


def recipe_from_dict(raw: dict, *, source_file: str | None = None) -> Recipe:
    """Build and validate a Recipe (RecipeError lists every problem). Checks files, not model weights."""
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a YAML mapping, got {type(raw).__name__}")
    raw = copy.deepcopy(raw)
    if "name" not in raw and source_file:
        raw["name"] = Path(source_file).stem
    top = [f.name for f in dataclasses.fields(Recipe) if f.name != "source_file"]
    for key in [k for k in raw if k not in top]:
        close = difflib.get_close_matches(str(key), top, n=1, cutoff=0.5)
        errors.append(f"recipe: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                                          else f" (known keys: {', '.join(top)})"))
        raw.pop(key)
    kw = {}
    for key, cls in _NESTED.items():
        if key in raw:
            if key == "data":
                continue
            kw[key] = _build(cls, raw.pop(key), key, errors)
    data_raw = raw.pop("data", None)
    if not isinstance(data_raw, dict):
        errors.append("data: required, a mapping with `train` (a list of sources), optional `heldout`, `synthetic`")
        data = None
    else:
        unknown = set(data_raw) - {"train", "heldout", "synthetic"}
        for key in sorted(unknown):
            close = difflib.get_close_matches(key, ["train", "heldout", "synthetic"], n=1, cutoff=0.5)
            errors.append(f"data: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        synthetic = data_raw.get("synthetic")
        data = DataSpec(train=_sources(data_raw.get("train"), "data.train", errors),
                        heldout=_sources(data_raw.get("heldout"), "data.heldout", errors),
                        synthetic=None if synthetic is None else _build(SyntheticSpec, synthetic, "data.synthetic",
                                                                        errors))
        if not data_raw.get("train"):
            errors.append("data.train: at least one source is needed")
    stages_raw = raw.pop("stages", None)
    stages = []
    if not isinstance(stages_raw, list) or not stages_raw:
        errors.append("stages: required, a non-empty list of stages (kind ild or kd)")
    else:
        for i, s in enumerate(stages_raw):
            where = f"stages[{i}]" + (f" ({s.get('name')})" if isinstance(s, dict) and s.get("name") else "")
            if isinstance(s, dict) and isinstance(s.get("yarn"), dict):
                s = dict(s, yarn=_build(YarnSpec, s["yarn"], f"{where}.yarn", errors))
                if s["yarn"] is None:
                    continue
            stage = _build(StageSpec, s, where, errors)
            if stage is not None:
                stages.append(stage)
    recipe = None
    if data is not None and not [e for e in errors if e.startswith(("stages", "data"))]:
        recipe = _build(Recipe, dict(raw, data=data, stages=stages, **{k: v for k, v in kw.items() if v is not None}),
                        "recipe", errors)
    if recipe is not None:
        recipe.source_file = source_file
        errors += validate(recipe)
    if errors:
        head = f"recipe {source_file} is invalid:" if source_file else "recipe is invalid:"
        raise RecipeError(head + "\n" + "\n".join(f"  - {e}" for e in errors))
    return recipe


def read_recipe(path, overrides: dict | str | None = None) -> dict:
    """A recipe YAML as a plain dict with `overrides` applied (not validated: recipe_from_dict does that)."""
    from ..errors import read_yaml_mapping

    return apply_overrides(read_yaml_mapping(path, "recipe file", RecipeError), overrides)


def load_recipe(path, overrides: dict | str | None = None) -> Recipe:
    return recipe_from_dict(read_recipe(path, overrides), source_file=str(path))
