"""Packed fixed-length training rows from a weighted mix of sources, plus synthetic long-context task rows.

A row is `seq_len` token ids. Text rows: documents (tokenized with their specials and an eos, sources.py)
are concatenated and cut every seq_len tokens; a document's tail continues in the next row. Each document
comes from source i with probability weight_i / sum(weights). Task rows (a fraction `synthetic.fraction`
of rows): one RULER-style sample from `tasks.generate_sample` (prompt of seq_len - answer_room tokens), its
answer (", "-joined values, ".", eos), then packed text to fill the row.

Determinism: every choice comes from one `random.Random(seed)` and the sources' own seeded orders, so a
(seed, sources, seq_len) triple always yields the same rows. The whole position is `state_dict()`: the rng
state, one running document index per source, the partial row buffer and the task-sample counter; a JSON
value, saved in trainer checkpoints so `--resume` continues with the very next row.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field

import torch

from .sources import SourceSpec, open_source, tokenize_document


@dataclass
class SyntheticSpec:
    """Mix of synthetic long-context task rows (recipe `data.synthetic`)."""

    fraction: float = 0.0  # share of rows that are task samples
    tasks: list[str] = field(default_factory=lambda: ["niah"])  # task names; "niah" = all NIAH tasks, "ruler" = all but qa_*
    haystack: str | None = None  # None: each task's own; "noise", "essay", or a .txt path
    answer_room: int = 64  # tokens left after the prompt for the answer and eos
    min_seq_len: int = 128  # shorter rows are all text (a task prompt needs some haystack to mean anything)

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"synthetic.fraction must be in [0, 1], got {self.fraction}")
        self.tasks = expand_tasks(self.tasks)
        if self.answer_room < 8:
            raise ValueError(f"synthetic.answer_room must be >= 8, got {self.answer_room}")

    def active(self, seq_len: int) -> bool:
        return self.fraction > 0 and seq_len >= self.min_seq_len


def fitting_tasks(synthetic: SyntheticSpec, tokenizer, seq_len: int, margin: int = 8) -> list[str]:
    """The synthetic tasks whose prompts fit in seq_len - answer_room tokens (min_length + margin, seed 0)."""
    from . import tasks

    room = seq_len - synthetic.answer_room
    return [t for t in synthetic.tasks if tasks.min_length(t, tokenizer) + margin <= room]


def expand_tasks(names) -> list[str]:
    from . import tasks

    out = []
    for name in [names] if isinstance(names, str) else names:
        if name == "niah":
            out += list(tasks.NIAH_TASKS)
        elif name == "ruler":
            out += [t for t in tasks.RULER_TASKS if t not in tasks.QA_TASKS]
        elif name in tasks.QA_TASKS:
            raise ValueError(f"synthetic task {name} needs a QA file; use niah_*, vt, cwe or fwe")
        elif name in tasks.RULER_TASKS:
            out.append(name)
        else:
            raise ValueError(f"unknown synthetic task {name!r}; known: niah, ruler, "
                             f"{', '.join(t for t in tasks.RULER_TASKS if t not in tasks.QA_TASKS)}")
    if not out:
        raise ValueError("synthetic.tasks is empty")
    return list(dict.fromkeys(out))


class PackedStream:
    """Endless packed rows: `next_batch(n)` -> LongTensor [n, seq_len]. See the module docstring."""

    def __init__(self, specs: list[SourceSpec], tokenizer, seq_len: int, *, seed: int = 0,
                 synthetic: SyntheticSpec | None = None, toy_world=None, sources=None):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if not specs:
            raise ValueError("no data source given")
        self.specs, self.tokenizer, self.seq_len, self.seed = list(specs), tokenizer, seq_len, seed
        # `sources`: already opened documents to share between streams (opening re-reads files).
        self.sources = sources or [open_source(s, seed=seed, toy_world=toy_world) for s in self.specs]
        self.weights = [s.weight for s in self.specs]
        self.synthetic = synthetic if synthetic is not None and synthetic.active(seq_len) else None
        self.task_names = fitting_tasks(synthetic, tokenizer, seq_len) if self.synthetic else []
        if self.synthetic and not self.task_names:
            warnings.warn(f"no synthetic task of {synthetic.tasks} fits in rows of {seq_len} tokens "
                          f"(prompt room {seq_len - synthetic.answer_room}): these rows are all text", stacklevel=2)
            self.synthetic = None
        self.rng = random.Random(f"hylo_lab.packing:{seed}")
        self.cursors = [0] * len(self.specs)
        self.buffer: list[int] = []
        self.rows = 0
        self.task_samples = 0

    def _fill(self, n: int):
        """Grow the buffer to >= n tokens with whole documents."""
        while len(self.buffer) < n:
            i = self.rng.choices(range(len(self.sources)), weights=self.weights)[0] if len(self.sources) > 1 else 0
            doc = self.sources[i].get(self.cursors[i])
            self.cursors[i] += 1
            self.buffer += tokenize_document(doc, self.tokenizer, self.specs[i].format)

    def _take(self, n: int) -> list[int]:
        self._fill(n)
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _task_row(self) -> list[int]:
        from . import tasks

        syn = self.synthetic
        task = self.rng.choice(self.task_names)
        depth = self.rng.random() if task in tasks.DEPTH_TASKS else None
        self.task_samples += 1
        try:
            sample = tasks.generate_sample(task, self.tokenizer, self.seq_len - syn.answer_room, depth=depth,
                                           seed=1_000_003 * (self.seed + 1) + self.task_samples,
                                           haystack=syn.haystack)
        except tasks.LengthTooShortError:  # this seed's needles tokenize a little longer: a text row instead
            self.task_samples -= 1
            return self._take(self.seq_len)
        answer = self.tokenizer.encode(" " + ", ".join(sample.answers) + ".", add_special_tokens=False)
        row = list(sample.input_ids) + answer + [self.tokenizer.eos_token_id]
        return row[: self.seq_len] + self._take(max(0, self.seq_len - len(row)))

    def next_row(self) -> list[int]:
        self.rows += 1
        if self.synthetic is not None and self.rng.random() < self.synthetic.fraction:
            return self._task_row()
        return self._take(self.seq_len)

    def next_batch(self, n: int) -> torch.Tensor:
        return torch.tensor([self.next_row() for _ in range(n)], dtype=torch.long)

    def epochs(self) -> list[int]:
        """How many times each source has wrapped around (0 = still in its first pass)."""
        return [src.epoch_of(max(c - 1, 0)) for src, c in zip(self.sources, self.cursors)]

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return dict(rng=[version, list(internal), gauss], cursors=list(self.cursors), buffer=list(self.buffer),
                    rows=self.rows, task_samples=self.task_samples, seq_len=self.seq_len, seed=self.seed,
                    sources=[s.label for s in self.specs])

    def load_state_dict(self, state: dict):
        if state["seq_len"] != self.seq_len or state["sources"] != [s.label for s in self.specs]:
            raise ValueError(f"data state is for seq_len={state['seq_len']}, sources {state['sources']}; this stream "
                             f"has seq_len={self.seq_len}, sources {[s.label for s in self.specs]}")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.cursors, self.buffer = list(state["cursors"]), list(state["buffer"])
        self.rows, self.task_samples = state["rows"], state["task_samples"]


def heldout_rows(specs: list[SourceSpec], tokenizer, seq_len: int, rows: int, *, seed: int = 0,
                 synthetic: SyntheticSpec | None = None, toy_world=None, sources=None) -> torch.Tensor:
    """`rows` packed rows [rows, seq_len] for evaluation, read from the sources' first pass only.

    Raises ValueError when the held-out data cannot fill them without repeating a document.
    """
    stream = PackedStream(specs, tokenizer, seq_len, seed=seed, synthetic=synthetic, toy_world=toy_world,
                          sources=sources)
    batch = stream.next_batch(rows)
    if any(stream.epochs()):
        raise ValueError(f"held-out data is too small for {rows} rows of {seq_len} tokens (it would repeat "
                         f"documents): lower train.eval_rows or add held-out data")
    return batch


def check_fills_row(specs: list[SourceSpec], tokenizer, seq_len: int, *, seed: int = 0, toy_world=None,
                    sources=None) -> None:
    """Raise ValueError when the sources together cannot fill one row of seq_len without repeating a document."""
    stream = PackedStream(specs, tokenizer, seq_len, seed=seed, toy_world=toy_world, sources=sources)
    stream.next_row()
    wrapped = [s.label for s, e in zip(specs, stream.epochs()) if e]
    if wrapped:
        raise ValueError(f"seq_len={seq_len} is longer than the data can provide: {', '.join(wrapped)} ran out of "
                         f"documents before one row was filled")
