"""Where training text comes from: one `SourceSpec` per source, opened as a sequence of documents.

Source types (`SourceSpec.type`):
- "text": a .txt file, a directory (every *.txt below it, sorted) or a glob. Each file is one document, or
  is split into documents at `separator` (e.g. "\\n\\n" for blank-line separated documents).
- "jsonl": one JSON record per line; `format: text` reads record[field] (default field "text"), `format:
  chat` reads a list of {"role", "content"} messages (default field "messages") and renders it with the
  tokenizer's chat template.
- "parquet": one column (`field`) of one or more parquet files (path, directory or glob); text or chat.
- "datasets": a Hugging Face `datasets` dataset: a directory written by `save_to_disk`, a local dataset
  directory / loading script (`path`), or a hub id (`name`, network only) with `streaming: true` to read
  without downloading it all. Map-style datasets are memory-mapped, the way to feed billions of tokens.
- "toy": the toy world's generated corpus (`split: train | heldout`, documents separated by blank lines).

Local text, jsonl and parquet sources are read into memory when opened: fine for the workbench's sizes;
use "datasets" (memory-mapped) for corpora that do not fit in RAM.

Documents are addressed by a running index k (0, 1, 2, ...) that never resets: `Documents.get(k)` returns
document k mod n of epoch k // n, epochs reshuffled from (seed, `SourceSpec.shuffle_key`, epoch) when `shuffle`
(the key names the file or folder but not where it lies, so copied data gives the same order). So a reader's
position is one integer, which is what makes packing resumable (packing.py).
"""

from __future__ import annotations

import glob as globlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE_TYPES = ("text", "jsonl", "parquet", "datasets", "toy")
FORMATS = ("text", "chat")


@dataclass
class SourceSpec:
    """One data source of a recipe's `data.train` / `data.heldout` lists (see the module docstring)."""

    type: str
    path: str | None = None  # file, directory or glob (text, jsonl, parquet, datasets local)
    name: str | None = None  # hub dataset id (type datasets)
    config: str | None = None  # hub dataset configuration name
    split: str = "train"  # datasets split; toy: train | heldout
    format: str = "text"  # text | chat
    field: str | None = None  # default "text" (format text) or "messages" (format chat)
    separator: str | None = None  # type text: split files into documents here; None = one document per file
    weight: float = 1.0  # mixing weight among the sources of one list
    shuffle: bool = True  # reshuffle document order every epoch (map-style sources)
    streaming: bool = False  # type datasets: stream instead of downloading / memory-mapping

    def __post_init__(self):
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source type {self.type!r} is unknown; choose one of {SOURCE_TYPES}")
        if self.format not in FORMATS:
            raise ValueError(f"source format {self.format!r} is unknown; choose one of {FORMATS}")
        if self.format == "chat" and self.type in ("text", "toy"):
            raise ValueError(f"format 'chat' needs structured records (jsonl, parquet, datasets), not type {self.type!r}")
        if self.type in ("text", "jsonl", "parquet") and not self.path:
            raise ValueError(f"a {self.type} source needs `path` (a file, directory or glob)")
        if self.type == "datasets" and bool(self.path) == bool(self.name):
            raise ValueError("a datasets source needs exactly one of `path` (local) or `name` (hub id)")
        if self.type == "toy" and self.split not in ("train", "heldout"):
            raise ValueError(f"toy source split must be 'train' or 'heldout', not {self.split!r}")
        if self.streaming and self.type != "datasets":
            raise ValueError("streaming applies to datasets sources only")
        if not self.weight > 0:
            raise ValueError(f"source weight must be > 0, got {self.weight}")
        if self.field is None:
            self.field = "messages" if self.format == "chat" else "text"

    @property
    def label(self) -> str:
        return f"{self.type}:{self.path or self.name or self.split}"

    @property
    def shuffle_key(self) -> str:
        """What seeds this source's epoch orders besides the seed: the label without the folders above the
        file, directory or glob, so the same data in another place (machine, temporary folder) gives the same
        rows."""
        if self.path:
            return f"{self.type}:{os.path.basename(self.path.rstrip('/'))}"
        return f"{self.type}:{self.name}/{self.config}" if self.name else f"{self.type}:{self.split}"

    def files(self) -> list[Path]:
        """The local files of a text / jsonl / parquet source (sorted); [] where nothing matches."""
        suffix = {"text": ".txt", "jsonl": ".jsonl", "parquet": ".parquet"}[self.type]
        pattern = os.path.expandvars(os.path.expanduser(self.path))
        p = Path(pattern)
        if p.is_file():
            return [p]
        if p.is_dir():
            return sorted(q for q in p.rglob(f"*{suffix}") if q.is_file())
        return sorted(Path(q) for q in globlib.glob(pattern, recursive=True) if Path(q).is_file())

    def max_tokens(self) -> int | None:
        """An upper bound on the tokens this source holds, without a tokenizer, or None when unknown.

        Byte-level tokenizers never make more tokens than bytes; +3 per document covers bos / eos / a
        template's specials. Only for uncompressed local files (text, jsonl); used to refuse a seq_len the
        data cannot fill before anything heavy is loaded.
        """
        if self.type not in ("text", "jsonl"):
            return None
        total = 0
        for f in self.files():
            size = f.stat().st_size
            docs = 1 if self.type == "text" and self.separator is None else size // 2 + 1
            total += size + 3 * docs
        return total


class Documents:
    """A finite list of raw documents (str, or a list of chat messages) read through a running index."""

    def __init__(self, docs, label: str, *, seed: int = 0, shuffle: bool = True, key: str | None = None):
        self.docs, self.label, self.seed, self.shuffle = docs, label, seed, shuffle
        self.key = label if key is None else key  # seeds the epoch orders (SourceSpec.shuffle_key)
        if len(docs) == 0:
            raise ValueError(f"data source {label} holds no documents")
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return len(self.docs)

    def order(self, epoch: int):
        if epoch != self._epoch:
            n = len(self.docs)
            if self.shuffle:
                seq = np.random.SeedSequence([self.seed, epoch, *self.key.encode()])
                self._order = np.random.default_rng(seq).permutation(n)
            else:
                self._order = np.arange(n)
            self._epoch = epoch
        return self._order

    def get(self, k: int):
        """Document k of the endless sequence epoch 0, epoch 1, ... (each a permutation of all documents)."""
        n = len(self.docs)
        return self.docs[int(self.order(k // n)[k % n])]

    def epoch_of(self, k: int) -> int:
        return k // len(self.docs)


class _ColumnView:
    """docs[i] -> dataset[i][field] for a map-style `datasets.Dataset` (memory-mapped, read on demand)."""

    def __init__(self, dataset, field: str):
        if field not in dataset.column_names:
            raise ValueError(f"dataset has no column {field!r}; columns: {dataset.column_names}")
        self.dataset, self.field = dataset, field

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i][self.field]


class StreamDocuments:
    """An iterable (streaming) dataset read in order; position k is restored by skipping k documents.

    Epochs restart the stream (in the same order). Resuming deep into a stream re-reads what it skips.
    """

    def __init__(self, dataset, field: str, label: str):
        self.dataset, self.field, self.label = dataset, field, label
        self._iter, self._next_k, self.length = None, 0, None

    def get(self, k: int):
        if self._iter is None or k != self._next_k:
            self._restart(k)
        while True:
            try:
                record = next(self._iter)
                break
            except StopIteration:
                if self._pos == 0:
                    raise ValueError(f"data source {self.label} holds no documents") from None
                self.length = self._pos
                self._iter, self._pos = iter(self.dataset), 0
        self._pos += 1
        self._next_k = k + 1
        return record[self.field]

    def _restart(self, k: int):
        skip = k if self.length is None else k % self.length
        self._iter, self._pos = iter(self.dataset.skip(skip) if skip else self.dataset), skip

    def epoch_of(self, k: int) -> int:
        return 0 if self.length is None else k // self.length


def _read_text(spec: SourceSpec) -> list[str]:
    docs = []
    for f in spec.files():
        text = f.read_text(encoding="utf-8")
        parts = [text] if spec.separator is None else text.split(spec.separator)
        docs += [d for d in parts if d.strip()]
    return docs


def _read_jsonl(spec: SourceSpec) -> list:
    docs = []
    for f in spec.files():
        with open(f, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f}:{line_no}: not valid JSON ({e.msg})") from None
                if spec.field not in record:
                    raise ValueError(f"{f}:{line_no}: record has no field {spec.field!r} "
                                     f"(fields: {sorted(record)}); set the source's `field`")
                docs.append(record[spec.field])
    return docs


def _read_parquet(spec: SourceSpec) -> list:
    import pyarrow.parquet as pq

    docs = []
    for f in spec.files():
        names = pq.read_schema(f).names
        if spec.field not in names:
            raise ValueError(f"{f}: no column {spec.field!r} (columns: {names}); set the source's `field`")
        docs += pq.read_table(f, columns=[spec.field]).column(spec.field).to_pylist()
    return docs


def _open_datasets(spec: SourceSpec, seed: int):
    import datasets

    if spec.path:
        path = Path(os.path.expandvars(os.path.expanduser(spec.path)))
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if spec.split not in ds:
                    raise ValueError(f"{path} has splits {list(ds)}, not {spec.split!r}")
                ds = ds[spec.split]
        else:
            ds = datasets.load_dataset(str(path), spec.config, split=spec.split, streaming=spec.streaming)
    else:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split, streaming=spec.streaming)
    if isinstance(ds, datasets.IterableDataset):
        return StreamDocuments(ds, spec.field, spec.label)
    return Documents(_ColumnView(ds, spec.field), spec.label, seed=seed, shuffle=spec.shuffle, key=spec.shuffle_key)


def open_source(spec: SourceSpec, *, seed: int = 0, toy_world=None):
    """The documents of `spec` (Documents or StreamDocuments). toy_world: a built `toy.ToyWorld` (type toy)."""
    if spec.type in ("text", "jsonl", "parquet"):
        if not spec.files():
            raise FileNotFoundError(f"data source {spec.label}: no {spec.type} file matches {spec.path!r}")
        read = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}[spec.type]
        return Documents(read(spec), spec.label, seed=seed, shuffle=spec.shuffle, key=spec.shuffle_key)
    if spec.type == "datasets":
        return _open_datasets(spec, seed)
    if toy_world is None:
        raise ValueError("a toy source needs the toy world (recipe `toy_world` section)")
    from .toy import read_corpus

    path = toy_world.corpus_train if spec.split == "train" else toy_world.corpus_heldout
    return Documents(read_corpus(path), spec.label, seed=seed, shuffle=spec.shuffle, key=spec.shuffle_key)


def tokenize_document(doc, tokenizer, fmt: str = "text") -> list[int]:
    """Token ids of one document: the tokenizer's own specials (e.g. Llama-3's BOS) + text + eos.

    fmt "chat": `doc` is a list of {"role", "content"} messages rendered by the tokenizer's chat template
    (which writes its own specials, so none are added on encoding).
    """
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat-format data needs a tokenizer with a chat template (tokenizer.chat_template)")
        if not isinstance(doc, list):
            raise ValueError(f"a chat document must be a list of messages, got {type(doc).__name__}")
        text = tokenizer.apply_chat_template(doc, tokenize=False)
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        if not isinstance(doc, str):
            raise ValueError(f"a text document must be a string, got {type(doc).__name__}: use format 'chat' "
                             f"for message lists")
        ids = tokenizer.encode(doc)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids
