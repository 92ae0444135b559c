"""The toy world: a generated corpus, a locally trained tokenizer and a ladder of small teachers, all offline.

No checkpoint can be downloaded here, so the project trains its own teachers:
- corpus: `toy_corpus.toy_corpus`, a templated English-like corpus over a fixed world of facts;
- tokenizer: byte-level BPE (1024 tokens, digits split one by one, the 256 bytes in the alphabet so nothing
  is ever <unk>), trained on the corpus plus the raw text of NIAH samples from `data/tasks/` (see
  `train_tokenizer` for the two-pass build);
- teachers: `TEACHERS`, Llama models at three sizes and one Qwen3, trained from scratch on packed corpus text
  mixed with samples of the needle tasks `TEACHER_NIAH_TASKS` and copy rows, at up to `TOY_TRAIN_LEN` tokens
  (`train_teacher`);
- `get_toy_world` builds all of it under a cache folder keyed by a hash of the settings and reuses it;
- `teacher_report` measures what the teachers must show: NIAH accuracy and held-out perplexity vs unigram.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..outputs import build_once
from .toy_corpus import heldout_seed, toy_corpus, vocabulary

TOY_WORLD_VERSION = 1
TOY_TRAIN_LEN = 256
# A training row holds a prompt of up to seq_len tokens plus its answer (<= 48 tokens for every NIAH task).
ANSWER_ROOM = 48
SPECIAL_TOKENS = dict(pad_token="<pad>", bos_token="<s>", eos_token="</s>")
HAYSTACKS = ("noise", "essay")

_LLAMA = dict(model_type="llama", vocab_size=1024, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
              rope_theta=10000.0, max_position_embeddings=TOY_TRAIN_LEN, initializer_range=0.02)
# The teacher ladder: GQA everywhere (num_key_value_heads < num_attention_heads) so MLA and GDN upcycling
# have KV heads to compress and repeat. vocab_size is overwritten with the tokenizer's length.
TEACHERS: dict[str, dict] = {
    "llama-xs": dict(_LLAMA, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16),
    "llama-s": dict(_LLAMA, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32),
    "llama-m": dict(_LLAMA, hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
                    num_key_value_heads=2, head_dim=32),
    "qwen3-s": dict(_LLAMA, model_type="qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6),
}
# How each teacher is trained by default (steps x batch_size rows of TOY_TRAIN_LEN + ANSWER_ROOM tokens).
# Every step also scores `copy_rows` copy rows (TeacherBatches.copy_batch): without them no teacher learns to
# retrieve a needle. NIAH rows use the needle tasks of TEACHER_NIAH_TASKS: one needle with a word key and a number
# value in a noise or an essay haystack; key matching among distractor needles (niah_multikey_1) and uuid values
# are out of reach at this size and budget, so neither is trained or asked. The remaining failures are digit-order
# slips inside the 7-digit value, which the many copy rows, the NIAH-heavy mix, the answer weight and no weight
# decay address; 4 layers is the smallest depth that retrieves. The search behind these values and the accuracies
# they reach: benchmarks/results/toy_search/README.md.
TEACHER_NIAH_TASKS = ("niah_single_1", "niah_single_2")
_TRAIN = dict(batch_size=16, copy_rows=64, niah_fraction=0.85, answer_weight=6.0, weight_decay=0.0,
              niah_tasks=TEACHER_NIAH_TASKS)
TEACHER_TRAINING: dict[str, dict] = {
    "llama-xs": dict(_TRAIN, steps=1500, lr=3e-3),
    "llama-s": dict(_TRAIN, steps=1500, lr=3e-3),
    "llama-m": dict(_TRAIN, steps=1500, lr=1.5e-3),
    "qwen3-s": dict(_TRAIN, steps=1500, lr=3e-3),
}
# quick=True (CI): the same code path with every teacher shrunk to this and trained for a few steps.
QUICK_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=16)
QUICK_TRAINING = dict(steps=12, batch_size=4, lr=3e-3, copy_steps=4, copy_rows=2, niah_fraction=0.6,
                      niah_tasks=TEACHER_NIAH_TASKS)
COPY_WARMUP = (32, 32)  # (rows, tokens) of the induction warm-up batches
COPY_LEN = 40  # tokens of the copy rows mixed into every later step
DIGIT_GROUP = 1  # the toy world's tokenizer splits numbers into single digits (1) or pairs (2); train_tokenizer
COPY_DIGITS = 0.5  # share of digit tokens in a copy segment (needle values are digit strings)
CORPUS_DOCS = dict(full=(12000, 500), quick=(600, 60))  # (train, held-out) documents


# ---------------------------------------------------------------------------------------------------------------
# Corpus and tokenizer


def write_corpus(path: Path, docs: list[str]) -> None:
    """One document per block, blocks separated by a blank line (documents contain single newlines only)."""
    Path(path).write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def read_corpus(path: Path) -> list[str]:
    return [d for d in Path(path).read_text(encoding="utf-8").split("\n\n") if d.strip()]


def _bpe_tokenizer(texts, vocab_size: int, digit_group: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits first, one by one (digit_group 1: "4711" is always 4 tokens) or in pairs from the left (2: 47 11),
    # then GPT-2 byte-level splitting: lossless on any text, and the 256-byte alphabet means no <unk> is needed.
    digits = (pre_tokenizers.Digits(individual_digits=True) if digit_group == 1 else
              pre_tokenizers.Split(Regex(r"\d{1,2}"), behavior="isolated"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        digits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)


def train_tokenizer(texts: list[str], vocab_size: int = 1024, *, task_text: bool = True, digit_group: int = 1):
    """Byte-level BPE over `texts` -> PreTrainedTokenizerFast (bos <s>, eos </s>, pad <pad>; no automatic bos).

    task_text: also train on `tasks.tokenizer_corpus()` (every template, haystack and key/value kind of the
    long-context tasks), repeated to about a quarter of the training text: evaluation prompts are all task
    text, so haystacks and needles should tokenize as compactly as the corpus. The words of the corpus
    vocabulary are added once as well, so rare ones still get merges.
    digit_group: 1 (default) splits numbers into single digits, 2 into pairs from the left ("5999014" ->
    59 99 01 4); every pair is in the training text 20 times, so with 1024 tokens each gets its own token
    (a smaller vocabulary may leave rare pairs as two digits, still lossless).
    """
    if digit_group not in (1, 2):
        raise ValueError(f"digit_group must be 1 or 2; got {digit_group!r}")
    base = list(texts) + [" ".join(vocabulary())]
    if digit_group == 2:  # every pair, often enough to be merged before rarer words
        base += [" ".join(f"{i:02d}" for i in range(100))] * 20
    if task_text:
        from . import tasks

        lines = tasks.tokenizer_corpus()
        repeat = max(1, round(sum(map(len, base)) / 3 / max(1, sum(map(len, lines)))))
        base += lines * repeat
    return _bpe_tokenizer(base, vocab_size, digit_group)


# ---------------------------------------------------------------------------------------------------------------
# Teachers


def teacher_config(name: str, *, vocab_size: int = 1024, quick: bool = False, seq_len: int = TOY_TRAIN_LEN):
    """The transformers config of teacher `name` (quick: the shrunken CI shape of the same architecture)."""
    from transformers import AutoConfig

    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; known: {', '.join(TEACHERS)}")
    kwargs = dict(TEACHERS[name], vocab_size=vocab_size, max_position_embeddings=seq_len)
    if quick:
        kwargs.update(QUICK_SHAPE)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0  # SPECIAL_TOKENS order
    return config


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class TeacherBatches:
    """Batches of training rows, each either packed corpus text or one NIAH sample.

    Every batch draws one prompt length L (seq_len with probability 1/4, else uniform in [min_len, seq_len]);
    its rows are L + ANSWER_ROOM tokens. A NIAH row is a sample of L tokens (random task, haystack and
    depth), its answer (`tasks.oracle_answer`: " a, b, c", then eos) and corpus text to fill the row.
    Targets are the next tokens; answer targets weigh `answer_weight`, all others 1.
    """

    def __init__(self, tokenizer, corpus_ids: torch.Tensor, *, seq_len: int, niah_fraction: float,
                 answer_weight: float, seed: int, min_len: int = 64, prompt_weight: float = 1.0, niah_tasks=None,
                 copy_digits: float = COPY_DIGITS):
        from . import tasks

        self.tasks, self.tokenizer, self.ids = tasks, tokenizer, corpus_ids
        self.niah_tasks = tuple(niah_tasks or tasks.NIAH_TASKS)
        # Shortest prompt each task fits in (over a few seeds, plus slack for long uuids).
        self.task_min = {t: max(tasks.min_length(t, tokenizer, seed=s) for s in range(3)) + 8 for t in self.niah_tasks}
        self.seq_len = seq_len
        self.min_len = min(max(min_len, min(self.task_min.values())), seq_len)
        self.niah_fraction, self.answer_weight, self.prompt_weight = niah_fraction, answer_weight, prompt_weight
        self.copy_digits = copy_digits
        self.rng = random.Random(f"teacher-batches-{seed}")
        self.gen = torch.Generator().manual_seed(seed)
        self.vocab_size = len(tokenizer)
        # Every token that is a digit string (single digits, and digit groups with digit_group > 1).
        vocab = tokenizer.get_vocab()
        self.digit_ids = torch.tensor(sorted(i for t, i in vocab.items() if t.isascii() and t.isdigit()))
        self.sample_seed = 10_000_000 * (seed + 1)  # far from the evaluation seeds (0, 1, ...)

    def copy_batch(self, batch_size: int, length: int):
        """Rows of `length` random tokens in which a segment (6-14 tokens, `copy_digits` of them digits) appears
        twice, after a random prefix (0-6 tokens) and with a random gap (0-8 tokens); only the repeat is scored.
        The offsets vary, so only content matching (an induction head) predicts the repeat, the skill every needle
        task needs: on NIAH and corpus rows alone a 4-layer teacher had not learned it after 1000+ steps."""
        g, rng = self.gen, self.rng
        rows = torch.randint(len(SPECIAL_TOKENS), self.vocab_size, (batch_size, length + 1), generator=g)
        weights = torch.zeros(batch_size, length)
        for i in range(batch_size):
            k, u, v = rng.randint(6, 14), rng.randint(0, 6), rng.randint(0, 8)
            seg = rows[i, u:u + k]
            digits = torch.rand(k, generator=g) < self.copy_digits
            seg[digits] = self.digit_ids[torch.randint(0, len(self.digit_ids), (int(digits.sum()),), generator=g)]
            s0 = u + k + v
            n = min(k, length + 1 - s0)
            rows[i, s0:s0 + n] = seg[:n]
            weights[i, s0:s0 + n - 1] = 1.0
        return rows[:, :-1], rows[:, 1:], weights

    def corpus_window(self, n: int) -> list[int]:
        start = self.rng.randrange(0, len(self.ids) - n)
        return self.ids[start:start + n].tolist()

    def niah_row(self, length: int, row_len: int):
        task = self.rng.choice([t for t in self.niah_tasks if self.task_min[t] <= length] or self.niah_tasks[:1])
        for _ in range(20):  # a few seeds' uuids tokenize too long for the shortest lengths: draw again
            self.sample_seed += 1
            try:
                sample = self.tasks.generate_sample(task, self.tokenizer, length, seed=self.sample_seed,
                                                    haystack=self.rng.choice(HAYSTACKS), depth=self.rng.random())
                break
            except ValueError:
                continue
        else:
            raise ValueError(f"cannot fit {task} into {length} tokens; raise min_len")
        answer = self.tokenizer.encode(self.tasks.oracle_answer(sample), add_special_tokens=False)
        answer.append(self.tokenizer.eos_token_id)
        row = list(sample.input_ids) + answer
        weights = [self.prompt_weight] * (len(sample.input_ids) - 1) + [self.answer_weight] * len(answer)
        fill = row_len + 1 - len(row)
        row += self.corpus_window(fill) if fill > 0 else []
        weights += [1.0] * max(fill, 0)
        return row[: row_len + 1], weights[:row_len]

    def __call__(self, batch_size: int):
        """-> inputs [B, L + ANSWER_ROOM], targets (inputs shifted by one), weights (float, same shape)."""
        length = self.seq_len if self.rng.random() < 0.25 else self.rng.randint(self.min_len, self.seq_len)
        row_len = length + ANSWER_ROOM
        rows, weights = [], []
        for _ in range(batch_size):
            if self.rng.random() < self.niah_fraction:
                row, w = self.niah_row(length, row_len)
            else:
                row, w = self.corpus_window(row_len + 1), [1.0] * row_len
            rows.append(row)
            weights.append(w)
        rows = torch.tensor(rows)
        return rows[:, :-1], rows[:, 1:], torch.tensor(weights)


def train_teacher(name: str, *, tokenizer=None, train_texts: list[str] | None = None, quick: bool = False,
                  steps: int | None = None, seq_len: int = TOY_TRAIN_LEN, batch_size: int | None = None,
                  lr: float | None = None, warmup: float = 0.05, weight_decay: float | None = None, clip: float = 1.0,
                  niah_fraction: float | None = None, answer_weight: float | None = None, prompt_weight: float = 1.0,
                  min_len: int = 64, niah_tasks=None, copy_steps: int | None = None, copy_rows: int | None = None,
                  copy_len: int = COPY_LEN, copy_digits: float = COPY_DIGITS, seed: int = 0, device: str = "auto",
                  bf16: bool | None = None, callback=None, progress: bool = True):
    """Train teacher `name` from scratch: AdamW, cosine schedule with linear warmup, grad clipping.

    Data: `TeacherBatches` (packed corpus + NIAH rows). Loss: next-token cross entropy, answer tokens
    up-weighted; bf16 autocast on CUDA by default. Copy rows (`TeacherBatches.copy_batch`): every step adds the
    loss of `copy_rows` rows of `copy_len` tokens in which a segment repeats (in-context copying, which needle
    retrieval needs; `copy_digits` of the segment are digits); the first `copy_steps` steps (0 by default) train on `COPY_WARMUP` copy rows only.
    Settings left None come from `TEACHER_TRAINING[name]` (`QUICK_TRAINING` with quick=True).
    Without `tokenizer` / `train_texts` the toy world's (built if needed, no teachers) are used.
    Returns the model in eval mode on CPU; `model.train_log` holds the loss per step, tokens and seconds.
    """
    from ..progress import bar as progress_bar
    from ..schedule import warmup_cosine
    from transformers import AutoModelForCausalLM

    if tokenizer is None or train_texts is None:
        world = get_toy_world(teachers=(), quick=quick, seed=seed, progress=progress)
        tokenizer = tokenizer or world.tokenizer()
        train_texts = train_texts if train_texts is not None else read_corpus(world.corpus_train)
    defaults = QUICK_TRAINING if quick else TEACHER_TRAINING[name]
    steps, batch_size, lr = steps or defaults["steps"], batch_size or defaults["batch_size"], lr or defaults["lr"]
    copy_steps = defaults.get("copy_steps", 0) if copy_steps is None else copy_steps
    copy_rows = defaults.get("copy_rows", 0) if copy_rows is None else copy_rows
    niah_fraction = defaults.get("niah_fraction", 0.6) if niah_fraction is None else niah_fraction
    answer_weight = defaults.get("answer_weight", 3.0) if answer_weight is None else answer_weight
    weight_decay = defaults.get("weight_decay", 0.1) if weight_decay is None else weight_decay
    niah_tasks = niah_tasks or defaults.get("niah_tasks")
    device = resolve_device(device)
    torch.manual_seed(seed)
    config = teacher_config(name, vocab_size=len(tokenizer), quick=quick, seq_len=seq_len)
    model = AutoModelForCausalLM.from_config(config).to(device)
    eos = tokenizer.eos_token_id
    corpus_ids = torch.tensor([t for doc in train_texts for t in tokenizer.encode(doc) + [eos]])
    batches = TeacherBatches(tokenizer, corpus_ids, seq_len=seq_len, niah_fraction=niah_fraction,
                             answer_weight=answer_weight, prompt_weight=prompt_weight, min_len=min_len,
                             niah_tasks=niah_tasks, seed=seed, copy_digits=copy_digits)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=no_decay,
                                  weight_decay=0.0)], lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    warmup_steps = max(1, int(warmup * steps))

    bf16 = device.type == "cuda" if bf16 is None else bf16
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    log = dict(loss=[], tokens=0, seconds=0.0, steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len,
               copy_steps=copy_steps, copy_rows=copy_rows, niah_fraction=niah_fraction,
               answer_weight=answer_weight, weight_decay=weight_decay)
    model.train()
    start = time.perf_counter()
    bar = progress_bar(range(steps), desc=f"teacher {name}", disable=not progress, mininterval=1.0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine(step, lr=lr, warmup_steps=warmup_steps, total_steps=steps, min_ratio=0.1)
        warm = step < copy_steps
        parts = [batches.copy_batch(*COPY_WARMUP) if warm else batches(batch_size)]
        if not warm and copy_rows:
            parts.append(batches.copy_batch(copy_rows, copy_len))
        loss = 0.0
        for inputs, targets, weights in parts:
            inputs, targets, weights = inputs.to(device), targets.to(device), weights.to(device)
            with autocast:
                logits = model(input_ids=inputs).logits
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            loss = loss + (ce * weights.flatten()).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        log["loss"].append(loss.item())
        log["tokens"] += sum(p[0].numel() for p in parts)
        if callback is not None:
            callback(step, model, log["loss"][-1])
        if progress:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{log['loss'][-1]:.3f}", tok_s=f"{log['tokens'] / elapsed:.0f}", refresh=False)
    log["seconds"] = time.perf_counter() - start
    model.eval().to("cpu")
    model.train_log = log
    return model


# ---------------------------------------------------------------------------------------------------------------
# The cached toy world


@dataclass
class ToyWorld:
    """Paths of a built toy world. Load with `tokenizer()`, `teacher(name)`; each teacher dir also holds
    the tokenizer, so `AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` work."""

    root: Path
    tokenizer_dir: Path
    corpus_train: Path
    corpus_heldout: Path
    teacher_dirs: dict[str, Path] = field(default_factory=dict)
    seq_len: int = TOY_TRAIN_LEN
    quick: bool = False
    seed: int = 0

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.tokenizer_dir)

    def teacher(self, name: str = "llama-s", **kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.teacher_dirs[name], **kwargs).eval()

    def teacher_info(self, name: str = "llama-s") -> dict:
        """What `done.json` recorded when the teacher was trained (settings, seconds, losses)."""
        return json.loads((self.teacher_dirs[name] / "done.json").read_text())


def default_root() -> Path:
    return Path(os.environ.get("HYLO_LAB_HOME") or Path.home() / ".cache" / "hylo_lab")


def _source_hash(*modules: str) -> str:
    """Hash of the data-generating sources: changing a template or a task invalidates the cached world."""
    here = Path(__file__).parent
    h = hashlib.sha256()
    for m in modules:
        path = here / f"{m}.py"
        h.update(path.read_bytes() if path.exists() else b"missing")
    return h.hexdigest()[:12]


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _build(final: Path, build_fn, progress: bool) -> None:
    """outputs.build_once with done.json as the marker: a killed build is rebuilt, the first finished one kept."""
    build_once(final, build_fn)


def first_build_warning(name: str, quick: bool, root: Path) -> str:
    """The line printed before a teacher is trained for the first time: how long it usually takes."""
    took = "under a minute" if quick else "usually 8-20 min on a 2-core CPU, a few minutes on a GPU"
    return (f"warning: training the toy teacher {name} for the first time ({took}); "
            f"later runs reuse it from {root}")


def get_toy_world(root: str | Path | None = None, *, teachers=("llama-s",), quick: bool = False, seed: int = 0,
                  progress: bool = True, training: dict | None = None, digit_group: int = DIGIT_GROUP) -> ToyWorld:
    """Build (or reuse) corpus, tokenizer and the requested teachers under `root` (default `$HYLO_LAB_HOME` or
    ~/.cache/hylo_lab) in `toy-world-<hash>/`, the hash covering the version, seed, quick, digit_group and data
    sources. Teachers live in `teachers/<name>-<hash of config and training settings>/`; `training` overrides
    every teacher's settings (`train_teacher` keywords over `TEACHER_TRAINING[name]`, e.g. {"steps": 1000}).
    quick=True: small corpus and tiny teachers for CI, same code path."""
    mode = "quick" if quick else "full"
    world_settings = dict(version=TOY_WORLD_VERSION, seed=seed, quick=quick, docs=CORPUS_DOCS[mode],
                          vocab_size=1024, digit_group=digit_group,
                          sources=_source_hash("toy_corpus", "tasks"))
    root = Path(root) if root is not None else default_root()
    wdir = root / f"toy-world-{mode}-{_key(world_settings)}"
    world = ToyWorld(root=wdir, tokenizer_dir=wdir / "tokenizer", corpus_train=wdir / "corpus_train.txt",
                     corpus_heldout=wdir / "corpus_heldout.txt", quick=quick, seed=seed)

    def build_world(tmp: Path) -> dict:
        t0 = time.perf_counter()
        num_train, num_heldout = CORPUS_DOCS[mode]
        train = toy_corpus(num_train, seed=seed)
        write_corpus(tmp / "corpus_train.txt", train)
        write_corpus(tmp / "corpus_heldout.txt", toy_corpus(num_heldout, seed=heldout_seed(seed)))
        tokenizer = train_tokenizer(train, 1024, digit_group=digit_group)
        tokenizer.save_pretrained(tmp / "tokenizer")
        return dict(world_settings, seconds=time.perf_counter() - t0)

    _build(wdir, build_world, progress)
    for name in teachers:
        config = teacher_config(name, quick=quick).to_dict()
        settings = dict(QUICK_TRAINING if quick else TEACHER_TRAINING[name], **(training or {}))
        tdir = wdir / "teachers" / f"{name}-{_key(dict(config=config, training=settings, seed=seed))}"
        world.teacher_dirs[name] = tdir

        def build_teacher(tmp: Path, name=name, training=settings) -> dict:
            tokenizer = world.tokenizer()
            model = train_teacher(name, tokenizer=tokenizer, train_texts=read_corpus(world.corpus_train),
                                  quick=quick, seed=seed, progress=progress, **training)
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            log = model.train_log
            return dict(name=name, training=training, seed=seed, seconds=log["seconds"], tokens=log["tokens"],
                        loss_first=log["loss"][0], loss_last=log["loss"][-1], loss=log["loss"])

        tdir.parent.mkdir(parents=True, exist_ok=True)
        if progress and not (tdir / "done.json").exists():
            print(first_build_warning(name, quick, wdir.parent), flush=True)
        _build(tdir, build_teacher, progress)
    return world


# ---------------------------------------------------------------------------------------------------------------
# Does the teacher work?


def niah_accuracy(model, tokenizer, *, lengths=(TOY_TRAIN_LEN,), num_samples: int = 20, seed: int = 0,
                  haystack=None, batch_size: int = 32, tasks=None) -> dict:
    """{length: {task: mean score_sample}} over `num_samples` samples per task (seeds seed..seed+n-1), decoded
    and scored by eval.ruler.answer_samples; `tasks`: the NIAH tasks to run (default all eight)."""
    from ..eval.ruler import answer_samples
    from . import tasks as task_gen

    kwargs = {} if haystack is None else dict(haystack=haystack)
    result = {}
    for length in lengths:
        result[length] = {}
        for task in tuple(tasks or task_gen.NIAH_TASKS):
            samples = [task_gen.generate_sample(task, tokenizer, length, seed=seed + i, **kwargs)
                       for i in range(num_samples)]
            scores = [r["score"] for r in answer_samples(model, tokenizer, samples, batch_size=batch_size)]
            result[length][task] = sum(scores) / len(scores)
    return result


def _windows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """`texts` packed (eos after each document) into [N, seq_len] windows; the tail shorter than one is dropped."""
    ids = [t for doc in texts for t in tokenizer.encode(doc) + [tokenizer.eos_token_id]]
    return torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)


@torch.no_grad()
def perplexity(model, tokenizer, texts: list[str], *, seq_len: int = TOY_TRAIN_LEN, batch_size: int = 16):
    """exp(mean next-token NLL, eval.perplexity.token_nll) over `texts` packed into windows of seq_len tokens."""
    from ..eval.perplexity import token_nll

    windows = _windows(tokenizer, texts, seq_len)
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        nll = token_nll(model, windows[b:b + batch_size])
        total += nll.sum().item()
        count += nll.numel()
    return math.exp(total / count)


def unigram_perplexity(tokenizer, train_texts: list[str], texts: list[str], *, seq_len: int = TOY_TRAIN_LEN):
    """Perplexity of an add-one-smoothed unigram model fitted on `train_texts`, on the same targets as
    `perplexity` scores (every token of each window but its first)."""
    eos = tokenizer.eos_token_id
    counts = torch.ones(len(tokenizer), dtype=torch.float64)
    for doc in train_texts:
        counts += torch.bincount(torch.tensor(tokenizer.encode(doc) + [eos]), minlength=len(tokenizer))
    logp = (counts / counts.sum()).log()
    windows = _windows(tokenizer, texts, seq_len)
    return math.exp(-logp[windows[:, 1:]].mean().item())


def teacher_report(model, tokenizer, *, lengths=(TOY_TRAIN_LEN,), num_samples: int = 20, seed: int = 0,
                   heldout_texts: list[str] | None = None, train_texts: list[str] | None = None,
                   seq_len: int = TOY_TRAIN_LEN) -> dict:
    """NIAH accuracy per length and task (greedy, cached decode, tasks.score_sample) and held-out perplexity
    vs a unigram model. Without texts: 300 held-out documents and 3000 training documents of seed 0."""
    heldout_texts = heldout_texts if heldout_texts is not None else toy_corpus(300, seed=heldout_seed(0))
    train_texts = train_texts if train_texts is not None else toy_corpus(3000, seed=0)
    niah = niah_accuracy(model, tokenizer, lengths=lengths, num_samples=num_samples, seed=seed)
    ppl = perplexity(model, tokenizer, heldout_texts, seq_len=seq_len)
    uni = unigram_perplexity(tokenizer, train_texts, heldout_texts, seq_len=seq_len)
    return dict(niah=niah, niah_mean={n: sum(v.values()) / len(v) for n, v in niah.items()},
                heldout_ppl=ppl, unigram_ppl=uni, ppl_ratio=ppl / uni)
