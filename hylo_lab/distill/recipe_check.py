"""The recipe checker: every problem of a built recipe that can be found without loading models or tokenizers
(values in range, choices known, paths present, lengths the data can fill), reported at once as RecipeError."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:
    from ..data.sources import SourceSpec
    from .stages import Recipe

STAGE_KINDS = ("ild", "kd")
KL_IMPLS = ("full", "chunked", "hidden", "topk")
PRECISIONS = ("auto", "bf16", "fp32")
TEACHER_DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")
BASE_SHAPE_KEYS = ("base_model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps",
                   "tie_word_embeddings", "attention_bias", "attention_qk_norm", "mlp_bias", "rope_parameters")



class RecipeError(UserError):
    """A recipe that cannot run; the message lists every problem found."""



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
            if st.kl == "topk":
                _check_number(errors, f"{w}.teacher_topk", st.teacher_topk, kind=int, low=1)
                if st.direction != "forward":
                    errors.append(f"{w}: kl=topk knows the teacher only on its top-k tokens: direction must be "
                                  f"'forward'")
                if st.teacher_cache is not None and (not isinstance(st.teacher_cache, str) or not st.teacher_cache
                                                     or Path(expand(st.teacher_cache)).is_file()):
                    errors.append(f"{w}: teacher_cache={st.teacher_cache!r} must be a folder (or null: no cache)")
            elif st.teacher_cache is not None or st.teacher_topk != type(st).teacher_topk:
                errors.append(f"{w}: teacher_topk and teacher_cache apply to kl=topk only (kl={st.kl!r})")
            if st.yarn is not None:
                _check_number(errors, f"{w}.yarn.factor", st.yarn.factor, low=1)
                _check_number(errors, f"{w}.yarn.original_max_position_embeddings",
                              st.yarn.original_max_position_embeddings, kind=int, low=1)
        else:
            kd_only = [k for k in ("yarn", "synthetic_fraction") if getattr(st, k) is not None]
            kd_only += [k for k in ("kl", "direction", "temperature", "kl_weight", "ce_weight", "kl_chunk_size",
                                    "vocab_chunk_size", "kl_backend", "teacher_topk", "teacher_cache")
                        if getattr(st, k) != type(st).__dataclass_fields__[k].default]
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
