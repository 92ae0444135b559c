"""The stage-1 cache: sweep points that share a recipe's first stage train it once.

    <root>/stage1/<key>/      root = toy_world.root or $HYLO_LAB_HOME or ~/.cache/hylo_lab (the toy world's)
      entry.json              the key's parts, the folders below, where they were trained; written last
      <first stage>/          its run folders as the trainer left them (<name>/<student>/final/ for ild)
      assembled/ [smart_scores.json]   the hybrid, when the first stage is the recipe's only ild stage
      upcycled/               the upcycled hybrid, when the first stage is a kd stage

key = sha256 over (1) the recipe as resolved (every default filled in) with `stages` cut to the first stage and
without name, output_dir, source_file, tracking, train.progress and train.log_every; for an ild first stage also
without `teacher` (stage 1 is taught by the base); (2) the files it reads: the toy world's corpus and tokenizer and
each toy model it loads (bytes), a local base / tokenizer / student.init / data path (names, sizes, mtimes), a hub
name as given; (3) the code: hylo_lab's version and the bytes of every hylo_lab/**/*.py except the modules stage 1
never runs (CODE_EXCLUDED); (4) where it runs: torch and transformers versions, cpu or the CUDA device's name.

An entry appears by one rename of a finished temporary folder (`.<key>.tmp-*`, never read), so it is whole or
absent; of two points that race for one key the first rename wins and the other's copy is dropped. A hit copies
the folders into the new run's output_dir with the new recipe's recipe.yaml: the trainer's `resume` then skips
the finished runs (its recipe check unchanged) and trains the later stages. HYLO_LAB_STAGE1_CACHE=0 turns it off.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ..outputs import build_once

ENV = "HYLO_LAB_STAGE1_CACHE"
ENTRY = "entry.json"
VERSION = 1
DROPPED = ("name", "output_dir", "source_file", "tracking")
DROPPED_TRAIN = ("progress", "log_every")
CODE_EXCLUDED = ("demo", "eval", "sweep", "cli.py", "plots.py", "tracking.py", "progress.py", "nbtools.py",
                 "executors.py", "compare.py", "stats.py")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def cache_root(recipe) -> Path:
    from ..data.toy import default_root
    from ..distill.stages import expand

    root = recipe.toy_world.root
    return (Path(expand(root)) if root else default_root()) / "stage1"


def code_hash() -> str:
    """hylo_lab's version and the bytes of its .py files outside CODE_EXCLUDED."""
    import hylo_lab

    pkg = Path(hylo_lab.__file__).parent
    h = hashlib.sha256(hylo_lab.__version__.encode())
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        if rel.parts[0] in CODE_EXCLUDED:
            continue
        h.update(str(rel).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _folder_bytes(folder: Path, skip=("done.json",)) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in skip):
        h.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _local_stat(ref: str) -> str:
    """A local file or folder as (names, sizes, mtimes) of its files; anything else (a hub name) as given."""
    from ..distill.stages import expand

    path = Path(expand(ref))
    if not path.exists():
        return ref
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns}\0".encode())
    return f"{path.resolve()}#{h.hexdigest()[:16]}"


def _where() -> str:
    import torch
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return f"torch {torch.__version__}, transformers {transformers.__version__}, {device}"


def key_parts(recipe) -> dict:
    """What determines the first stage's result (see the module docstring); `recipe` a distill Recipe."""
    r = recipe.to_dict()
    first = r["stages"][0]
    r["stages"] = [first]
    for k in DROPPED:
        r.pop(k, None)
    for k in DROPPED_TRAIN:
        r["train"].pop(k, None)
    if r["train"]["device"] == "cpu" or not _cuda():
        r["train"]["device"] = "cpu"
    if first["kind"] == "ild":
        r.pop("teacher", None)
    r["toy_world"].pop("root", None)
    refs = [recipe.base, recipe.tokenizer, recipe.student.init] + ([recipe.teacher_name] if "teacher" in r else [])
    refs += [s.path for s in recipe.data.train + recipe.data.heldout if s.path]
    inputs = {}
    world = _toy_world(recipe) if recipe.uses_toy() else None
    if world is not None:
        inputs["toy_world"] = _world_bytes(world)
    for ref in dict.fromkeys(x for x in refs if x):
        inputs[ref] = (_folder_bytes(world.teacher_dirs[ref[4:]]) if ref.startswith("toy:") else _local_stat(ref))
    return dict(version=VERSION, recipe=r, inputs=inputs, code=code_hash(), where=_where())


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _world_bytes(world) -> str:
    h = hashlib.sha256()
    for path in (world.corpus_train, world.corpus_heldout):
        h.update(path.read_bytes() + b"\0")
    h.update(_folder_bytes(world.tokenizer_dir).encode())
    return h.hexdigest()[:16]


def _toy_world(recipe):
    """The toy world the trainer will use (built there too; cached, so cheap after the first build)."""
    from ..data.toy import get_toy_world

    refs = (recipe.base, recipe.teacher, recipe.tokenizer)
    names = tuple(dict.fromkeys(n[4:] for n in refs if isinstance(n, str) and n.startswith("toy:")))
    tw = recipe.toy_world
    return get_toy_world(tw.root, teachers=names, quick=tw.quick, seed=tw.seed, progress=False,
                         training=tw.training, digit_group=tw.digit_group)


def stage1_key(recipe) -> tuple[str, dict]:
    parts = key_parts(recipe)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20], parts


def folders(recipe) -> list[str]:
    """The entries of output_dir that hold the first stage's result, for this recipe's stage list."""
    first = recipe.stages[0]
    if first.kind == "ild":
        only = [st.name for st in recipe.stages if st.kind == "ild"] == [first.name]
        return [first.name] + (["assembled", "smart_scores.json"] if only else [])
    return (["upcycled"] if recipe.student.init is None else []) + [first.name]


def _finished(out: Path, recipe) -> bool:
    first = recipe.stages[0]
    if first.kind == "ild":
        runs = [p for p in (out / first.name).glob("*") if p.is_dir()] if (out / first.name).is_dir() else []
        return bool(runs) and all((p / "final" / "done.json").is_file() for p in runs)
    return (out / first.name / "final" / "done.json").is_file()


def lookup(root: Path, key: str) -> Path | None:
    """The finished entry of `key`, or None (absent, or not written by store: no readable entry.json)."""
    entry = root / key
    try:
        info = json.loads((entry / ENTRY).read_text())
    except (OSError, ValueError):
        return None
    return entry if info.get("key") == key else None


def restore(entry: Path, recipe, out: Path) -> list[str]:
    """Copy the entry's stage-1 folders that this recipe uses into `out` (a fresh output_dir) with this recipe's
    recipe.yaml, as a run of it would have left them after stage 1; paths in their json files point into `out`."""
    from ..distill.checkpoints import record_recipe

    info = json.loads((entry / ENTRY).read_text())
    origin, copied = info["origin"], []
    out.mkdir(parents=True, exist_ok=True)
    for name in folders(recipe):
        src = entry / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, out / name)
            for path in (out / name).rglob("*.json"):
                _repoint(path, origin, str(out))
        else:
            shutil.copy2(src, out / name)
        copied.append(name)
    record_recipe(out, recipe.to_dict(), {})
    return copied


def _repoint(path: Path, old: str, new: str):
    def walk(v):
        if isinstance(v, str) and (v == old or v.startswith(old + os.sep)):
            return new + v[len(old):]
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    data = json.loads(path.read_text())
    fixed = walk(data)
    if fixed != data:
        path.write_text(json.dumps(fixed, indent=2))


def store(root: Path, key: str, parts: dict, recipe, out: Path) -> tuple[Path, bool]:
    """Copy the finished first stage of `out` to root/key by outputs.build_once (a temporary sibling, entry.json
    last, one rename). Returns (entry, stored); stored is False when another run's entry was there first (kept)."""

    def fill(tmp: Path) -> dict:
        names = []
        for name in folders(recipe):
            src = out / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=shutil.ignore_patterns("checkpoints"))
            elif src.is_file():
                shutil.copy2(src, tmp / name)
            else:
                continue
            names.append(name)
        return dict(key=key, folders=names, origin=str(out), stage=recipe.stages[0].name, parts=parts)

    stored = build_once(root / key, fill, marker=ENTRY, finished=lambda entry: lookup(entry.parent, key) is not None)
    return root / key, stored


def prepare(recipe, out: Path, log) -> dict:
    """Before the run: look the first stage up; on a hit fill `out` with it. Returns the state `finish` needs:
    {} when the cache is off, else dict(root, key, parts, hit)."""
    first = recipe.stages[0]
    if not enabled():
        log(f"stage 1 ({first.name}): cache off ({ENV}=0), trained in this run")
        return {}
    root = cache_root(recipe)
    key, parts = stage1_key(recipe)
    entry = lookup(root, key)
    if entry is not None:
        try:
            copied = restore(entry, recipe, out)
        except (OSError, ValueError, KeyError) as exc:
            shutil.rmtree(out, ignore_errors=True)
            log(f"stage 1 ({first.name}): warning: the cached stage in {entry} cannot be copied ({exc}); "
                f"trained in this run")
            return dict(root=root, key=key, parts=parts, hit=None, broken=True)
        log(f"stage 1 ({first.name}): reused from {entry} ({', '.join(copied)}); not trained again")
    return dict(root=root, key=key, parts=parts, hit=entry)


def finish(state: dict, recipe, out: Path, log) -> str | None:
    """After a run without a hit: store its finished first stage; one log line. Returns the entry's path."""
    if not state or state["hit"] is not None or state.get("broken"):
        return None
    first = recipe.stages[0]
    if not _finished(out, recipe):
        log(f"stage 1 ({first.name}): trained, not finished, not stored")
        return None
    try:
        entry, stored = store(state["root"], state["key"], state["parts"], recipe, out)
    except OSError as exc:
        log(f"stage 1 ({first.name}): trained; warning: not stored in {state['root']} ({exc})")
        return None
    log(f"stage 1 ({first.name}): trained and stored for reuse in {entry}" if stored else
        f"stage 1 ({first.name}): trained; another run stored the same stage first in {entry} (kept)")
    return str(entry)
