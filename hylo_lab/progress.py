"""What a researcher watches while a long command runs: progress bars, one overall progress line, quiet libraries.

A progress bar (`bar`) takes one of four forms, chosen once per process from where it runs:
- "widget": a Jupyter kernel with ipywidgets (JupyterLab): tqdm's notebook widget, live in Lab and one output in
  an executed notebook;
- "live": a terminal: tqdm's single self-rewriting line on stderr;
- "lines": anything else (`hylo-lab demo` executing its notebook, CI logs, pipes): a handful of plain lines on
  stdout (the start, each quarter, the end), never one line per refresh;
- "off": nothing.
`$HYLO_LAB_PROGRESS` (widget | live | lines | off) overrides the choice; `hylo-lab demo` sets "lines" for its kernel.

`Overall` is the whole command's line: "[demo 3/7 distill | 2:41 elapsed, about 4:10 left]". The estimate is the
expected seconds of the steps still to run (a typical run's), scaled by how the finished steps compared with theirs:
    left = sum(expected[i] for i >= k) * elapsed / sum(expected[i] for i < k)     (k finished steps; k = 0: unscaled)
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

MODES = ("widget", "live", "lines", "off")


def mode() -> str:
    """The form progress bars take here (see the module docstring)."""
    chosen = os.environ.get("HYLO_LAB_PROGRESS", "").strip().lower()
    if chosen in MODES:
        return chosen
    if "ipykernel" in sys.modules:
        try:
            import ipywidgets  # noqa: F401

            return "widget"
        except ImportError:
            return "lines"
    return "live" if sys.stderr.isatty() else "lines"


class _Lines:
    """A tqdm-like counter that prints at most `parts` + 1 lines: 0%, every 1/parts of `total`, and the end."""

    def __init__(self, iterable=None, total=None, desc: str = "", parts: int = 4, file=None):
        self.iterable, self.desc, self.parts, self.n = iterable, desc, parts, 0
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.file, self.postfix, self.t0, self._shown = file or sys.stdout, "", time.perf_counter(), -1
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def set_postfix(self, *args, refresh: bool = True, **kwargs):
        self.postfix = ", ".join(f"{k}={v}" for k, v in kwargs.items())

    def set_description(self, desc: str, refresh: bool = True):
        self.desc = desc

    def _print(self, final: bool = False):
        total = f"/{self.total}" if self.total else ""
        took = format_seconds(time.perf_counter() - self.t0)
        rest = f" ({self.postfix})" if self.postfix else ""
        print(f"{self.desc}: {self.n}{total} {'done in' if final else 'after'} {took}{rest}", file=self.file,
              flush=True)

    def update(self, n: int = 1):
        self.n += n
        if self.total:
            part = min(self.parts, self.n * self.parts // self.total)
            if part > self._shown and self.n < self.total:
                self._shown = part
                self._print()

    def refresh(self):
        pass

    def close(self):
        if not self.closed:
            self.closed = True
            self._print(final=True)


class _Off(_Lines):
    def _print(self, final: bool = False):
        pass


def bar(iterable=None, *, total: int | None = None, desc: str = "", disable: bool = False, **kwargs):
    """A progress bar over `iterable` (or `total` updates) in this process's form (`mode`)."""
    how = "off" if disable else mode()
    if how == "widget":
        from tqdm.notebook import tqdm

        return tqdm(iterable, total=total, desc=desc, **kwargs)
    if how == "live":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **kwargs)
    return (_Off if how == "off" else _Lines)(iterable, total=total, desc=desc)


def format_seconds(seconds: float) -> str:
    """75 -> '1:15', 4000 -> '1:06:40'."""
    seconds = int(round(max(0.0, seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Overall:
    """The overall progress of one command: `expected` maps each step's name to its typical seconds, in order
    (relative=True: to its relative cost, e.g. tokens; no estimate then until a step has finished).
    `step(name)` marks the start of a step and prints the line; `done()` prints the total."""

    def __init__(self, what: str, expected: dict[str, float], *, echo=None, relative: bool = False):
        self.what, self.expected, self.t0 = what, dict(expected), time.perf_counter()
        self.relative = relative
        self.finished: list[str] = []
        self.current: str | None = None
        self.echo = echo or (lambda line: print(line, flush=True))

    def left(self) -> float:
        """Estimated seconds until the end, from the step now starting on (the module docstring's formula)."""
        names = list(self.expected)
        done = [n for n in names if n in self.finished]
        todo = [n for n in names if n not in self.finished]
        spent = sum(self.expected[n] for n in done)
        scale = self.elapsed() / spent if spent > 0 else 1.0
        return scale * sum(self.expected[n] for n in todo)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def line(self) -> str:
        names = list(self.expected)
        k = names.index(self.current) + 1 if self.current in names else len(self.finished)
        left = ("estimate after the first step" if self.relative and not self.finished
                else f"about {format_seconds(self.left())} left")
        return f"[{self.what} {k}/{len(names)} {self.current or ''} | {format_seconds(self.elapsed())} elapsed, {left}]"

    def step(self, name: str) -> None:
        if self.current is not None and self.current not in self.finished:
            self.finished.append(self.current)
        self.current = name
        self.echo(self.line())

    def done(self) -> str:
        if self.current is not None and self.current not in self.finished:
            self.finished.append(self.current)
        line = f"[{self.what} done in {format_seconds(self.elapsed())}]"
        self.echo(line)
        return line


def quiet_third_party() -> None:
    """Silence the known noise of libraries at its source, once: transformers' FutureWarnings and its
    "Loading weights" bars, huggingface_hub's download bars, tqdm's "IProgress not found" warning, MLflow's INFO
    lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(transformers|past_key_values|Transformers).*")
    warnings.filterwarnings("ignore", message=r"IProgress not found")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..." on stderr
    if "transformers" in sys.modules or _importable("transformers"):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _importable(name: str) -> bool:
    from importlib.util import find_spec

    return find_spec(name) is not None
