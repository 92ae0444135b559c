"""Output folders that are never half-written: check before heavy work, write beside, move into place on success.

    check_writable(out, "--out-dir")           # UserError now, not after an hour of evaluation
    with locked(out, "hylo-lab eval"), staged(out) as tmp:
        ... write under tmp ...                # out keeps the previous results until this block succeeds
    build_once(cache / key, fill)              # a shared cache entry: built by one writer, whole or absent
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError


def check_writable(path, what: str = "output folder") -> Path:
    """`path` as an absolute Path if it is a folder (or can become one) that this process can write in; else
    UserError. A missing folder is judged by its nearest existing parent; nothing is created."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {path} cannot be created: {probe} is not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot write in {probe} ({exc.strerror or exc}); choose a writable folder") \
            from None
    return path


@contextlib.contextmanager
def staged(final, *, whole: bool = False):
    """Yields a fresh sibling folder of `final`; on success its entries replace the same-named entries of `final`
    (created if missing; other entries of `final` stay), or with whole=True it replaces `final` itself. On failure
    it is removed and `final` is untouched."""
    final = Path(final).absolute()
    tmp = _sibling(final)
    try:
        yield tmp
        if whole:
            replace(tmp, final)
            return
        final.mkdir(exist_ok=True)
        for entry in sorted(tmp.iterdir()):
            replace(entry, final / entry.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_once(final, build, *, marker: str = "done.json", finished=None) -> bool:
    """Build the folder `final` at most once. `build(tmp)` fills a fresh sibling `.<name>.tmp-*` and returns a
    json-able dict, written last as tmp/marker; one rename then moves tmp to `final`, so a reader sees it whole or
    not at all. A finished `final` (`finished(final)`, by default: final/marker is a file) is kept, checked before
    building and again at the rename: the first finished writer wins. A `final` left unfinished (no marker) is
    replaced. Returns whether this call's folder was moved into place; on an error tmp is removed."""
    final = Path(final).absolute()
    finished = finished or (lambda folder: (folder / marker).is_file())
    if finished(final):
        return False
    tmp = _sibling(final)
    try:
        info = build(tmp)
        (tmp / marker).write_text(json.dumps(info, indent=1, default=str))
        while True:
            try:
                os.rename(tmp, final)  # fails on a non-empty final: never over a finished one
                return True
            except OSError:
                if finished(final):
                    return False
                if final.exists() or final.is_symlink():
                    aside = final.with_name(f".{final.name}.unfinished-{os.getpid()}")
                    try:
                        os.rename(final, aside)
                    except FileNotFoundError:  # another writer moved it first
                        continue
                    shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink()
                    continue
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path):
    """Yields a fresh temporary path beside the file `path` (unique, so writers never share it); on success it is
    renamed over `path`, so a reader sees the old file or the new one, never half of one; on failure removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would outlive the rename
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _sibling(final: Path) -> Path:
    """A fresh empty folder `.<name>.tmp-*` beside `final`, with the permissions a plain mkdir would give."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would outlive the move
    return tmp


def replace(src: Path, dst: Path) -> None:
    """Move `src` onto `dst` (file or folder), the old `dst` kept aside until the move succeeded."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


@contextlib.contextmanager
def locked(folder, command: str):
    """Holds an exclusive lock on `folder` (a `.<name>.lock` file beside it) for the block; a second process asking
    for the same folder gets UserError at once. The lock goes with the process, so a kill leaves none behind."""
    folder = Path(folder).absolute()
    folder.parent.mkdir(parents=True, exist_ok=True)
    path = folder.parent / f".{folder.name}.lock"
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks, no check
            yield
            return
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(f"{folder} is in use by {holder}; wait for it to finish or choose another folder") \
                from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{command} (pid {os.getpid()})")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
