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
"""

from __future__ import annotations

from hylo_lab.errors import UserError
import copy
import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data.packing import SyntheticSpec
from ..data.sources import SourceSpec

STAGE_KINDS = ("ild", "kd")
KL_IMPLS = ("full", "chunked", "hidden")
PRECISIONS = ("auto", "bf16", "fp32")
TEACHER_DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
BASE_SHAPE_KEYS = ("base_model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                   "tie_word_embeddings", "attention_bias", "attention_qk_norm", "mlp_bias", "rope_parameters")


class RecipeError(UserError):
    """A recipe that cannot run; the message lists every problem found."""


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
    kl: str = "full"  # full (T x V logits) | chunked (token chunks) | hidden (logit-free tiles)
    direction: str = "forward"  # forward = KL(teacher || student) | reverse
    temperature: float = 1.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0  # next-token cross-entropy on the data (the paper: 0)
    kl_chunk_size: int = 4096  # tokens per chunk (chunked, hidden)
    vocab_chunk_size: int = 8192  # vocabulary tile (hidden)
    kl_backend: str = "auto"  # hidden: auto | torch | fla
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
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///<cwd>/mlflow.db
    run_name: str | None = None  # None: the recipe's name
    log_model_max_mb: float = 200.0  # the final model's files become artifacts when smaller; else only its path


@dataclass
class ToyWorldSpec:
    root: str | None = None  # None: $HYLO_LAB_HOME or ~/.cache/hylo_lab
    quick: bool = False
    seed: int = 0


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


# ---------------------------------------------------------------------------------------------------------------
# dict -> dataclasses, collecting every problem


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
    import yaml

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: a recipe is a YAML mapping, got {type(raw).__name__}")
    return apply_overrides(raw, overrides)


def load_recipe(path, overrides: dict | str | None = None) -> Recipe:
    return recipe_from_dict(read_recipe(path, overrides), source_file=str(path))


# ---------------------------------------------------------------------------------------------------------------
# Dotted overrides: any recipe field from a sweep axis or a notebook parameter


def parse_overrides(text: str | dict | None) -> dict:
    """"stages.kd-long.steps=300; student.layout=2MLA2M2" (items split at ';' or newlines, values read as YAML)
    or a YAML mapping "{stages.kd-long.steps: 300}" -> {"stages.kd-long.steps": 300}. "" and None: {}."""
    import yaml

    if text is None or isinstance(text, dict):
        return dict(text or {})
    text = str(text).strip()
    if text.startswith("{"):
        try:
            out = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"overrides {text!r} are not a valid YAML mapping: {exc}") from None
        if not isinstance(out, dict):
            raise RecipeError(f"overrides {text!r}: expected a mapping of dotted keys to values")
        return out
    out = {}
    for item in (i.strip() for i in text.replace("\n", ";").split(";")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"override {item!r}: expected KEY=VALUE such as stages.kd-long.steps=300")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise RecipeError(f"override {item!r}: the value is not valid YAML") from None
    return out


def format_overrides(overrides: dict) -> str:
    """The inverse of parse_overrides: "key=value; ..." with values as JSON (a subset of YAML)."""
    import json

    return "; ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())


def apply_overrides(raw: dict, overrides: dict | str | None) -> dict:
    """A copy of the recipe dict `raw` with each dotted key set: `train.batch_size`, `stages.<name>.steps` (a stage
    by its name, or `stages.<index>`), `stages.kd-long.yarn.factor`. `stages.<name>: null` drops the stage; a
    missing mapping on the way is created. Unknown final keys are left for the recipe checker to name."""
    out = copy.deepcopy(raw)
    for key, value in parse_overrides(overrides).items():
        parts = str(key).split(".")
        node, where = out, []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                names = [s.get("name") if isinstance(s, dict) else None for s in node]
                index = names.index(part) if part in names else int(part) if part.isdigit() else None
                if index is None or index >= len(node):
                    known = ", ".join(str(n) for n in names if n)
                    raise RecipeError(f"override {key}: {'.'.join(where) or 'recipe'} has no entry {part!r}"
                                      + (f" (it has {known})" if known else ""))
                if last:
                    if value is None:
                        node.pop(index)
                    else:
                        node[index] = value
                    break
                node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                    break
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            else:
                raise RecipeError(f"override {key}: {'.'.join(where)} is {node!r}, not a mapping or a list")
            where.append(part)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Value and path checks


def expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def _check_number(errors, where, value, *, kind=float, low=None, high=None, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        errors.append(f"{where}: expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        return
    if low is not None and (value < low or (low_open and value == low)):
        errors.append(f"{where}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        errors.append(f"{where}={value} must be {'<' if high_open else '<='} {high}")


def _unset_hint(path: str) -> str:
    import re

    unset = [v for v in re.findall(r"\$\{?(\w+)", expand(path))]
    return f" (environment variable {', '.join(unset)} is not set)" if unset else ""


def _check_model_ref(errors, where, ref):
    """A toy:NAME, an existing local model directory, or (with network) a hub id."""
    if not isinstance(ref, str) or not ref:
        errors.append(f"{where}: expected a model directory, hub id or toy:NAME, got {ref!r}")
        return
    if ref.startswith("toy:"):
        from ..data.toy import TEACHERS

        if ref[4:] not in TEACHERS:
            errors.append(f"{where}: unknown toy teacher {ref[4:]!r}; known: {', '.join(TEACHERS)}")
        return
    p = Path(expand(ref))
    if p.is_dir():
        if not (p / "config.json").is_file():
            errors.append(f"{where}: directory {str(p)!r} has no config.json (not a saved model)")
        return
    looks_local = ref.startswith((".", "/", "~", "$")) or p.exists() or ref.count("/") != 1
    if looks_local:
        errors.append(f"{where}: {ref!r} is not an existing directory{_unset_hint(ref)}")
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        errors.append(f"{where}: {ref!r} is not a local directory and HF_HUB_OFFLINE=1 forbids the hub")


def validate(r: Recipe) -> list[str]:
    """Every problem of a built recipe that can be found without loading models or tokenizers."""
    errors: list[str] = []
    t = r.train
    _check_model_ref(errors, "base", r.base)
    if r.teacher is not None:
        _check_model_ref(errors, "teacher", r.teacher)
    if r.tokenizer is not None:
        _check_model_ref(errors, "tokenizer", r.tokenizer)
    if not isinstance(r.output_dir, str) or not r.output_dir:
        errors.append("output_dir: required, a directory for checkpoints and results")
    elif Path(expand(r.output_dir)).is_file():
        errors.append(f"output_dir: {r.output_dir!r} is a file")
    _check_number(errors, "seed", r.seed, kind=int, low=0)

    # student
    s = r.student
    if s.init is not None:
        p = Path(expand(s.init))
        if not (p / "config.json").is_file():
            errors.append(f"student.init: {s.init!r} is not a saved model directory (no config.json)")
        if any(v is not None for v in (s.layout, s.mla_layers, s.select, s.preset, s.linear)) or s.upcycle:
            errors.append("student.init loads a finished HyLo model: drop layout / mla_layers / select / preset / "
                          "linear / upcycle")
    elif s.layout is None and s.preset is None and s.mla_layers is None:
        errors.append("student: give a layout (e.g. '4MLA12GDN'), a preset, mla_layers, or init (a saved model)")
    if s.select == "smart" and not r.data.train:
        errors.append("student.select=smart needs training data for its calibration rows")
    _check_number(errors, "student.calibration_rows", s.calibration_rows, kind=int, low=1)
    if not isinstance(s.upcycle, dict):
        errors.append("student.upcycle: expected a mapping of upcycle() options")
    else:
        import inspect

        from ..upcycle import UpcycleOptions, upcycle

        params = set(inspect.signature(upcycle).parameters) | set(UpcycleOptions.__dataclass_fields__)
        params -= {"base", "layout", "mla_layers", "select", "preset", "linear", "calibration_ids", "calibration_mask",
                   "options", "overrides"}
        from ..config import HyloConfig

        config_keys = set(inspect.signature(HyloConfig.__init__).parameters) - {"self", "kwargs"}
        for key in s.upcycle:
            if key not in params and key not in config_keys:
                close = difflib.get_close_matches(key, sorted(params | config_keys), n=1, cutoff=0.6)
                errors.append(f"student.upcycle: unknown option {key!r}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
            elif key in ("layout", "mixers", "mla_layers"):
                errors.append(f"student.upcycle: set {key!r} on `student`, not inside `upcycle`")
            elif key in ("dtype", "seed"):
                errors.append(f"student.upcycle: {key!r} is set by the trainer (float32 students, the recipe's "
                              f"seed); remove it")
            elif key in BASE_SHAPE_KEYS:
                errors.append(f"student.upcycle: {key!r} comes from the base's config.json and cannot be changed")

    # train
    _check_number(errors, "train.batch_size", t.batch_size, kind=int, low=1)
    if t.micro_batch_size is not None:
        _check_number(errors, "train.micro_batch_size", t.micro_batch_size, kind=int, low=1)
        if isinstance(t.batch_size, int) and isinstance(t.micro_batch_size, int) and t.micro_batch_size >= 1 \
                and t.batch_size % t.micro_batch_size:
            errors.append(f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size={t.micro_batch_size}")
    if not (isinstance(t.lr_betas, (list, tuple)) and len(t.lr_betas) == 2
            and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t.lr_betas)):
        errors.append(f"train.lr_betas: expected two numbers in [0, 1), got {t.lr_betas!r}")
    _check_number(errors, "train.weight_decay", t.weight_decay, low=0)
    _check_number(errors, "train.eps", t.eps, low=0, low_open=True)
    _check_number(errors, "train.clip", t.clip, low=0)
    for key, allowed in (("precision", PRECISIONS), ("teacher_dtype", TEACHER_DTYPES), ("device", DEVICES)):
        if getattr(t, key) not in allowed:
            errors.append(f"train.{key}={getattr(t, key)!r}; choose one of {allowed}")
    for key in ("checkpoint_every", "eval_every"):
        _check_number(errors, f"train.{key}", getattr(t, key), kind=int, low=0)
    for key in ("keep_checkpoints", "eval_rows", "log_every"):
        _check_number(errors, f"train.{key}", getattr(t, key), kind=int, low=1)

    # stages
    names = [st.name for st in r.stages]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        errors.append(f"stages: name {dup!r} is used twice (stage names name their output folders)")
    seen_kd = False
    for i, st in enumerate(r.stages):
        w = f"stages[{i}] ({st.name})"
        if not isinstance(st.name, str) or not st.name or any(c in st.name for c in "/\\ ") or st.name.startswith("."):
            errors.append(f"{w}: name must be a non-empty folder name without '/', '\\\\' or spaces")
        if st.kind not in STAGE_KINDS:
            errors.append(f"{w}: kind={st.kind!r}; choose one of {STAGE_KINDS}")
        if st.kind == "kd":
            seen_kd = True
        elif st.kind == "ild":
            if seen_kd:
                errors.append(f"{w}: an ild stage must come before every kd stage (it trains the two students "
                              f"the hybrid is assembled from)")
            if s.init is not None:
                errors.append(f"{w}: an ild stage trains upcycled all-MLA / all-linear students; it cannot start "
                              f"from student.init")
            if s.layout is not None and "ATTN" in str(s.layout).upper():
                errors.append(f"{w}: ild assembles MLA and linear layers only; layout {s.layout!r} keeps attention")
        _check_number(errors, f"{w}.seq_len", st.seq_len, kind=int, low=2)
        if (st.steps is None) == (st.tokens is None):
            errors.append(f"{w}: give exactly one of steps or tokens")
        elif st.steps is not None:
            _check_number(errors, f"{w}.steps", st.steps, kind=int, low=1)
        else:
            _check_number(errors, f"{w}.tokens", st.tokens, low=1)
        _check_number(errors, f"{w}.lr", st.lr, low=0, low_open=True)
        _check_number(errors, f"{w}.warmup", st.warmup, low=0, high=1, high_open=True)
        _check_number(errors, f"{w}.min_lr_ratio", st.min_lr_ratio, low=0, high=1)
        bs, micro = r.stage_batch(st)
        if st.batch_size is not None:
            _check_number(errors, f"{w}.batch_size", st.batch_size, kind=int, low=1)
        if st.micro_batch_size is not None:
            _check_number(errors, f"{w}.micro_batch_size", st.micro_batch_size, kind=int, low=1)
        if isinstance(bs, int) and isinstance(micro, int) and micro >= 1 and bs >= 1 and bs % micro:
            errors.append(f"{w}: batch_size={bs} is not a multiple of micro_batch_size={micro}")
        _check_number(errors, f"{w}.mixer_weight", st.mixer_weight, low=0)
        if st.kind == "kd":
            if st.kl not in KL_IMPLS:
                errors.append(f"{w}: kl={st.kl!r}; choose one of {KL_IMPLS}")
            if st.direction not in ("forward", "reverse"):
                errors.append(f"{w}: direction={st.direction!r}; choose 'forward' (KL(teacher||student)) or 'reverse'")
            if st.kl_backend not in ("auto", "torch", "fla"):
                errors.append(f"{w}: kl_backend={st.kl_backend!r}; choose auto, torch or fla")
            _check_number(errors, f"{w}.temperature", st.temperature, low=0, low_open=True)
            _check_number(errors, f"{w}.kl_weight", st.kl_weight, low=0)
            _check_number(errors, f"{w}.ce_weight", st.ce_weight, low=0)
            if not (st.kl_weight or 0) and not (st.ce_weight or 0):
                errors.append(f"{w}: kl_weight and ce_weight are both 0: nothing to train on")
            _check_number(errors, f"{w}.kl_chunk_size", st.kl_chunk_size, kind=int, low=1)
            _check_number(errors, f"{w}.vocab_chunk_size", st.vocab_chunk_size, kind=int, low=1)
            if st.yarn is not None:
                _check_number(errors, f"{w}.yarn.factor", st.yarn.factor, low=1)
                _check_number(errors, f"{w}.yarn.original_max_position_embeddings",
                              st.yarn.original_max_position_embeddings, kind=int, low=1)
        else:
            kd_only = [k for k in ("yarn", "synthetic_fraction") if getattr(st, k) is not None]
            kd_only += [k for k in ("kl", "direction", "temperature", "kl_weight", "ce_weight", "kl_chunk_size",
                                    "vocab_chunk_size", "kl_backend")
                        if getattr(st, k) != StageSpec.__dataclass_fields__[k].default]
            if kd_only:
                errors.append(f"{w}: {kd_only} apply to kd stages only")
        if st.synthetic_fraction is not None:
            _check_number(errors, f"{w}.synthetic_fraction", st.synthetic_fraction, low=0, high=1)
            if r.data.synthetic is None:
                errors.append(f"{w}: synthetic_fraction needs a data.synthetic section (which tasks)")

    # data: files exist, and lengths the data can fill
    for where, specs in (("data.train", r.data.train), ("data.heldout", r.data.heldout)):
        for i, spec in enumerate(specs):
            if spec.type in ("text", "jsonl", "parquet") and not spec.files():
                errors.append(f"{where}[{i}]: no {spec.type} file matches {spec.path!r}{_unset_hint(spec.path)}")
            if spec.type == "datasets" and spec.path and not Path(expand(spec.path)).exists():
                errors.append(f"{where}[{i}]: datasets path {spec.path!r} does not exist")
            if spec.type == "datasets" and spec.name and os.environ.get("HF_DATASETS_OFFLINE") == "1":
                errors.append(f"{where}[{i}]: hub dataset {spec.name!r} with HF_DATASETS_OFFLINE=1")
    if not errors:
        train_max = _max_tokens(r.data.train)
        heldout_max = _max_tokens(r.data.heldout)
        for i, st in enumerate(r.stages):
            if train_max is not None and st.seq_len > train_max:
                errors.append(f"stages[{i}] ({st.name}): seq_len={st.seq_len} is longer than the training data can "
                              f"provide (at most {train_max} tokens in all)")
            if heldout_max is not None and st.seq_len * t.eval_rows > heldout_max:
                errors.append(f"stages[{i}] ({st.name}): train.eval_rows={t.eval_rows} rows of {st.seq_len} tokens "
                              f"need more than the held-out data holds (at most {heldout_max} tokens)")
    return errors


def _max_tokens(specs: list[SourceSpec]) -> int | None:
    if not specs:
        return None
    bounds = [s.max_tokens() for s in specs]
    return None if any(b is None for b in bounds) else sum(bounds)
