"""A distillation run's folder on disk: its lock, its recorded recipe, checkpoints, best and final weights.

    output_dir/
      .lock                       pid, host, since: one training process at a time (a stale one is taken over)
      recipe.yaml                 the recipe as resolved, written once; recipe_changes.yaml: allowed changes after it
      <run>/checkpoints/step-NNNNNNNN/   accelerate state + trainer_state.json (step, tokens, data position, eval_kl)
      <run>/best/                 the weights of the best held-out KL so far (+ best.json)
      <run>/final/                save_pretrained + tokenizer + done.json
Every folder and file is written beside its place (.tmp) and renamed into it, so a kill leaves the old one or the
new one, never half of one. `restore` loads the newest readable checkpoint; an unreadable one is moved aside to
step-NNNNNNNN.unreadable and the one before it tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import time
import typing
from pathlib import Path

from ..errors import UserError
from ..outputs import atomic_file
from .distributed import full_state_dict, load_state, save_pretrained, save_state
from .stages import Recipe, RecipeError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
LOCK = ".lock"
# Recipe fields that never change what the weights become: a resume may change them freely.
BOOKKEEPING = ("name", "output_dir", "source_file", "tracking", "toy_world.root", "train.progress",
               "train.log_every", "train.device", "train.checkpoint_every", "train.keep_checkpoints",
               "train.eval_every")


def write_atomic(path: Path, text: str):
    """Write beside `path`, then rename over it: a kill leaves the old file or the new one, never half of one."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------------------------------------------
# The lock


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


def refuse_locked(out: Path, info: dict):
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
                refuse_locked(out, holder)
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


# ---------------------------------------------------------------------------------------------------------------
# The recorded recipe


def _flat(value, prefix="") -> dict:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()} or {
            prefix[:-1]: {}}
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def _key_order(key: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split(".")]


def recipe_default(key: str, cls=None):
    """The value a recipe that leaves out the dotted field `key` ("toy_world.digit_group", "stages.1.lr") gets,
    or dataclasses.MISSING where the field is required or unknown."""
    head, _, rest = key.partition(".")
    cls = cls or Recipe
    field = {f.name: f for f in dataclasses.fields(cls)}.get(head) if dataclasses.is_dataclass(cls) else None
    if field is None:
        return dataclasses.MISSING
    kind = typing.get_type_hints(cls).get(head)
    if rest and typing.get_origin(kind) is list:
        index, _, rest = rest.partition(".")
        (item,) = typing.get_args(kind) or (None,)
        return recipe_default(rest, item) if index.isdigit() and rest and dataclasses.is_dataclass(item) \
            else dataclasses.MISSING
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return dataclasses.MISSING
    if dataclasses.is_dataclass(value):
        return recipe_default(rest, type(value)) if rest else dataclasses.asdict(value)
    return dataclasses.MISSING if rest else value


def recipe_changes(recorded: dict, current: dict) -> dict[str, tuple]:
    """{dotted key: (recorded value, current value)} for every field that differs, bookkeeping fields included
    ("<absent>" where one side has no such key). A field the recorded recipe lacks (recorded before the field
    existed) is no change while the current value is its default."""
    import yaml

    a, b = _flat(recorded), _flat(yaml.safe_load(yaml.safe_dump(current)))  # tuples -> lists, as recorded
    for k in set(b) - set(a):
        default = recipe_default(k)
        if default is not dataclasses.MISSING and yaml.safe_load(yaml.safe_dump(default)) == b[k]:
            a[k] = b[k]
    return {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b), key=_key_order)
            if a.get(k, "<absent>") != b.get(k, "<absent>")}


def shapes_weights(key: str) -> bool:
    return not any(key == f or key.startswith(f + ".") for f in BOOKKEEPING)


def recipe_yaml(data) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


def recorded_recipe(out: Path) -> tuple[dict | None, str]:
    """The recipe the run's weights came from: recipe.yaml, or the last allowed change after it; and where."""
    import yaml

    changes, first = out / "recipe_changes.yaml", out / "recipe.yaml"
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


def record_recipe(out: Path, recipe: dict, changes: dict[str, tuple]):
    """recipe.yaml once, when the run starts; a change that shapes the weights is appended to recipe_changes.yaml
    with the runs finished and the checkpoints resumed under the recipe before it."""
    import yaml

    if not (out / "recipe.yaml").is_file():
        write_atomic(out / "recipe.yaml", recipe_yaml(recipe))
    elif changes and any(shapes_weights(k) for k in changes):
        path = out / "recipe_changes.yaml"
        entries = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
        entries.append(dict(since=time.strftime("%Y-%m-%d %H:%M:%S"),
                            finished_runs=sorted(str(p.parent.parent.relative_to(out))
                                                 for p in out.glob("**/final/done.json")),
                            resumed_from=sorted(str(p.parent.relative_to(out)) for p in
                                                out.glob("**/checkpoints/step-*/trainer_state.json")),
                            changes={k: dict(old=a, new=b) for k, (a, b) in changes.items()},
                            recipe=yaml.safe_load(recipe_yaml(recipe))))
        write_atomic(path, recipe_yaml(entries))


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


def save_checkpoint(acc, run_dir: Path, step: int, state: dict, *, keep: int) -> Path:
    """Accelerate state (model, optimizer, RNG) + trainer_state.json `state` as checkpoints/step-NNNNNNNN; only
    the newest `keep` are kept. Collective: every process calls it."""
    main = acc.is_main_process
    ckdir = run_dir / "checkpoints"
    tmp = ckdir / f"step-{step:08d}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        ckdir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    save_state(acc, str(tmp))
    if main:
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(ckdir / f"step-{step:08d}", ignore_errors=True)  # os.replace cannot replace a folder
        os.replace(tmp, ckdir / f"step-{step:08d}")
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return ckdir / f"step-{step:08d}"


def restore(acc, run: str, run_dir: Path, log) -> tuple[Path | None, dict | None]:
    """Load the newest readable checkpoint into the prepared model and optimizer -> (it, its trainer state), or
    (None, None) when there is none. An unreadable one is moved aside (step-N.unreadable) and the one before it
    tried."""
    found = list_checkpoints(run_dir)
    for i, ckpt in enumerate(reversed(found)):
        try:
            state = json.loads((ckpt / "trainer_state.json").read_text())
            load_state(acc, str(ckpt))
        except UserError:  # readable, but not by this launch (FSDP vs not): keep it
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file: torch, json, accelerate
            bad = ckpt.with_name(ckpt.name + ".unreadable")
            if acc.is_main_process:
                shutil.rmtree(bad, ignore_errors=True)
                os.replace(ckpt, bad)
            acc.wait_for_everyone()
            older = found[len(found) - 2 - i] if i + 1 < len(found) else None
            log(f"{run}: warning: checkpoint {ckpt.name} cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); moved to {bad}; "
                + (f"falling back to {older.name}" if older else "no older checkpoint is left"))
            continue
        return ckpt, state
    if found:
        raise UserError(f"{run}: no checkpoint in {run_dir / 'checkpoints'} can be read (moved aside as "
                        f"*.unreadable); delete that folder to restart this run from its beginning")
    return None, None


# ---------------------------------------------------------------------------------------------------------------
# Weights: best, final, and whole models


def student_state_dict(acc, wrapper) -> dict:
    """The wrapped student's full state dict (gathered under FSDP; collective), keys without "student."."""
    state_dict = full_state_dict(acc, wrapper)
    return {k[len("student."):]: v for k, v in state_dict.items() if k.startswith("student.")}


def save_student(acc, wrapper, folder: Path, tokenizer, info_name: str, info: dict, *, model=None):
    """The wrapped student's weights (save_pretrained), the tokenizer and `info_name` (JSON) as `folder`, written
    to folder.tmp and renamed. Collective. `model`: the unwrapped student to save (default: wrapper's)."""
    state_dict = student_state_dict(acc, wrapper)
    if model is None:
        model = acc.unwrap_model(wrapper).student
    if acc.is_main_process:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_pretrained(acc, model, tmp, state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / info_name).write_text(json.dumps(info, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    acc.wait_for_everyone()


def save_model(acc, model, final: Path, tokenizer, info: dict):
    """A whole (unwrapped, unsharded) model as `final`: save_pretrained + tokenizer + done.json."""
    if acc.is_main_process:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "done.json").write_text(json.dumps(info, indent=2, default=str))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    acc.wait_for_everyone()
