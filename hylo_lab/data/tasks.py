"""RULER-style long-context tasks: 13 synthetic generators, offline, seedable, exactly `length` tokens.

Modelled on the task descriptions of RULER (Hsieh et al., 2024), with short prompts a toy model can learn:

| task            | haystack  | needles                                    | answers                     |
|-----------------|-----------|--------------------------------------------|-----------------------------|
| niah_single_1   | noise     | 1 (word key -> number)                     | the number                  |
| niah_single_2   | essay     | 1 (word key -> number)                     | the number                  |
| niah_single_3   | essay     | 1 (word key -> uuid)                       | the uuid                    |
| niah_multikey_1 | essay     | 1 asked + 3 distractor keys                | the asked number            |
| niah_multikey_2 | needles   | 1 asked; the haystack is other needles     | the asked number            |
| niah_multikey_3 | needles   | as multikey_2 with uuid keys and values    | the asked uuid              |
| niah_multivalue | essay     | 1 key with 4 values                        | all 4 numbers               |
| niah_multiquery | essay     | 4 keys, all asked                          | all 4 numbers               |
| vt              | noise     | a chain `VAR B = VAR A` of 5 variables     | every variable of the chain |
| cwe             | word list | 10 words x 30, others x 3 (scaled down)    | the 10 common words         |
| fwe             | coded text| Zipf(alpha=2) counts of synthetic words    | the 3 most frequent words   |
| qa_1            | documents | 1 gold paragraph (SQuAD-style records)     | any gold answer             |
| qa_2            | documents | gold paragraphs (HotpotQA-style records)   | any gold answer             |

Construction. A prompt is separately tokenized pieces, concatenated (never the tokenization of the whole text):
BOS (only if the tokenizer adds one itself) + intro + haystack pieces with needle pieces inserted + question and
answer prefix ("\\nAnswer:"; for the NIAH tasks, as in RULER, followed by the needle restated up to its value,
e.g. "\\nAnswer: The magic number for steep-cactus is", so the answer continues it). The haystack is filled
piece by piece (noise/essay/file sentences, other needles, documents, list words) and its last piece is cut at token level, so `len(input_ids) == length` exactly and
every needle's token span is known (`meta["needle_spans"]`). Pieces are written with their natural leading
space; for tokenizers that add a prefix space themselves (SentencePiece-like, whitespace pre-tokenizers) that
space is dropped. Haystack sentences, words and documents are tokenized once per tokenizer and cached.

Determinism. Everything is drawn from random.Random(f"...:{task}:{seed}"): keys, values and the haystack
start depend on (task, seed) only, so the same seed at another length or depth gives the same needle, moved.
Caches are keyed by the tokenizer object: do not add tokens to a tokenizer after generating with it.

Answers. `answers` lists the expected strings (niah_multivalue: in text order; niah_multiquery: in the order
asked; vt: along the chain); `oracle_answer` is the ideal continuation " a, b, c" (QA: " a"), and
`max_new_tokens` is its token count plus a quarter (at least 4). cwe scales RULER's plan (10 words x 30, the
rest x 3) down below ~600 list words (fewer common words, others once); fwe uses expected Zipf counts with
the top 3 strictly above the 4th. `min_length(task, tokenizer, seed=...)` gives the shortest possible prompt.

Depth. `depth` = fraction of haystack tokens before the first asked needle (niah_*: needle 0; qa_*: the first
gold paragraph). The needle goes to the piece boundary nearest `depth * haystack_tokens`, so it is at most half
a sentence away; `Sample.depth` keeps the requested (or, for depth=None, randomly drawn) value and
`meta["needle_depths"]` the realised ones. Other needles (distractors, extra values/queries, gold paragraphs)
sit at random depths. vt, cwe and fwe take no depth (`Sample.depth is None`).

Haystacks. "noise": "The grass is green. The sky is blue. ..." repeated; "essay": random sentences over a
built-in vocabulary (deterministic, cut from an endless stream at a seeded start); a path: a local .txt file or
a directory of .txt files (recursively, sorted), split into sentences and cycled. `haystack=None` takes the
task's own (table above). Tasks without a text haystack (niah_multikey_2/3, cwe, fwe, qa_*) ignore it.

QA file format (jsonl, one record a line; qa_1 and qa_2 read the same format):
    {"question": str, "answers": [str, ...] | str, "context": str}           # SQuAD-style, one gold paragraph
    {"question": str, "answers": [str, ...] | str, "paragraphs": [str, ...]}  # HotpotQA-style, all gold
Sample `seed` uses record `seed % len(records)`; the other records' paragraphs are the distractor documents.

Suites. `generate_suite` returns a `SuiteSamples`, a plain list of Sample with a `.not_run` dict of what was
skipped and why: key = task (qa_* without qa_file) or "task@length" (that length too short for the task).

Scoring (RULER): niah_*, vt, cwe, fwe: fraction of the expected strings found in the prediction ("all");
qa_*: 1.0 if any expected string is found ("part"). Case-insensitive substring match, whitespace collapsed.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import numbers
import random
import re
import string
import uuid
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

RULER_TASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
)
NIAH_TASKS: tuple[str, ...] = RULER_TASKS[:8]
QA_TASKS: tuple[str, ...] = ("qa_1", "qa_2")
DEPTH_TASKS: tuple[str, ...] = NIAH_TASKS + QA_TASKS

# queries: keys asked; values: values per asked key; distractors: default extra needles with other keys.
NIAH_SPECS: dict[str, dict] = {
    "niah_single_1": dict(haystack="noise", key="word", value="number", queries=1, values=1, distractors=0),
    "niah_single_2": dict(haystack="essay", key="word", value="number", queries=1, values=1, distractors=0),
    "niah_single_3": dict(haystack="essay", key="word", value="uuid", queries=1, values=1, distractors=0),
    "niah_multikey_1": dict(haystack="essay", key="word", value="number", queries=1, values=1, distractors=3),
    "niah_multikey_2": dict(haystack="needles", key="word", value="number", queries=1, values=1, distractors=0),
    "niah_multikey_3": dict(haystack="needles", key="uuid", value="uuid", queries=1, values=1, distractors=0),
    "niah_multivalue": dict(haystack="essay", key="word", value="number", queries=1, values=4, distractors=0),
    "niah_multiquery": dict(haystack="essay", key="word", value="number", queries=4, values=1, distractors=0),
}
TYPE_NAMES = {"word": ("word", "words"), "number": ("number", "numbers"), "uuid": ("uuid", "uuids")}

ANSWER_PREFIX = "\nAnswer:"
NIAH_INTRO = "Memorize the magic {vs} hidden in the text.\n"
NIAH_NEEDLE = " The magic {v} for {key} is {value}."
VT_INTRO = "Memorize and track the variable assignments in the text.\n"
VT_HOPS = 4
VT_DIGITS = 5
CWE_INTRO = "Below is a list of words. Memorize the ones that appear most often.\n"
CWE_QUESTION = "\nWhat are the {k} most common words in the list?"
CWE_FREQ = (10, 30, 3)  # RULER's num_cw, freq_cw, freq_ucw, used from 600 list words on
FWE_INTRO = "Read the coded text and find the three most frequent coded words.\n"
FWE_QUESTION = "\nWhat are the three most frequent coded words in the text?"
FWE_ALPHA = 2.0
QA_INTRO = "Answer the question based on the documents below."
QA_DOCUMENT = "\nDocument: {text}"
QA_QUESTION = "\n\nQuestion: {question}"

NOISE_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                   "There and back again.")

KEY_ADJECTIVES = (
    "amber", "ancient", "bitter", "bold", "brave", "bright", "brisk", "calm", "clever", "cold", "cool", "crisp",
    "curly", "dark", "deep", "dry", "dusty", "eager", "fair", "fancy", "fast", "fierce", "flat", "fresh",
    "gentle", "giant", "glad", "golden", "grand", "green", "happy", "hidden", "hollow", "humble", "icy", "jolly",
    "kind", "large", "lazy", "little", "lively", "lone", "loud", "lucky", "mellow", "mighty", "misty", "modern",
    "narrow", "neat", "noble", "odd", "old", "pale", "plain", "polite", "proud", "quick", "quiet", "rapid",
    "rare", "red", "rich", "rough", "round", "royal", "rusty", "sandy", "sharp", "shiny", "silent", "silver",
    "simple", "sleepy", "slow", "small", "smooth", "soft", "solid", "sour", "spicy", "steady", "steep", "sticky",
    "stormy", "strong", "sunny", "sweet", "swift", "tall", "tame", "tender", "tidy", "tiny", "vast", "warm",
    "wild", "windy", "wise", "yellow",
)
KEY_NOUNS = (
    "anchor", "apple", "arrow", "badger", "banana", "barn", "basket", "beacon", "bear", "bell", "berry",
    "bicycle", "bird", "blanket", "boat", "bottle", "bridge", "brush", "bucket", "butter", "cabin", "cactus",
    "camel", "candle", "canyon", "carpet", "castle", "cat", "cherry", "circle", "cloud", "clover", "coin",
    "comet", "cookie", "copper", "cottage", "crayon", "crown", "cup", "daisy", "desk", "dolphin", "door",
    "dragon", "drum", "eagle", "engine", "falcon", "feather", "fence", "fern", "fiddle", "flag", "flute",
    "forest", "fox", "garden", "glove", "goat", "grape", "hammer", "harbor", "hat", "helmet", "hill", "horse",
    "island", "jacket", "jar", "kettle", "kite", "ladder", "lamp", "lemon", "lion", "lizard", "magnet", "maple",
    "meadow", "mirror", "monkey", "moon", "mountain", "ocean", "orange", "otter", "owl", "panda", "parrot",
    "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pond", "puzzle", "rabbit", "river",
    "robot", "rocket", "saddle", "shell", "ship", "spoon", "star", "stone", "tiger", "tower", "train", "tulip",
    "turtle", "violin", "wagon", "whale", "window", "wolf", "zebra",
)
ESSAY_NOUNS = (
    "people", "city", "village", "teacher", "student", "market", "letter", "story", "morning", "evening",
    "winter", "summer", "road", "school", "friend", "family", "country", "music", "book", "idea", "house",
    "street", "table", "paper", "field", "farmer", "worker", "doctor", "child", "neighbor", "problem", "company",
    "office", "plan", "journey", "history", "language", "kitchen", "library", "museum", "station", "machine",
    "picture", "season", "weather", "message", "lesson", "painter", "writer", "artist", "engineer", "bakery",
    "factory", "valley", "farm", "shop", "theater", "chair", "floor", "wall", "roof", "hallway", "lunch",
    "dinner", "breakfast", "bread", "coffee", "tea", "water", "fire", "light", "shadow", "song", "game", "team",
    "club", "meeting", "report", "project", "result", "method", "system", "reason", "moment", "minute", "hour",
    "week", "month", "year", "voice", "face", "hand", "heart", "mind", "memory", "dream", "promise", "distance",
    "center", "corner", "edge", "surface", "path", "border", "region", "crowd", "group", "member", "leader",
    "visitor", "stranger", "traveler", "sailor", "captain", "professor", "scientist", "baker", "nurse", "pilot",
)
ESSAY_VERBS = (
    "walked", "found", "built", "carried", "opened", "watched", "painted", "visited", "cleaned", "followed",
    "wrote", "read", "moved", "helped", "called", "closed", "noticed", "planted", "repaired", "shared",
    "studied", "described", "discussed", "changed", "started", "finished", "explained", "bought", "sold",
    "brought", "kept", "left", "met", "heard", "saw", "took", "gave", "made", "used", "wanted", "needed",
    "liked", "loved", "chose", "joined", "reached", "crossed", "passed", "lifted", "pulled", "pushed", "filled",
    "covered", "checked", "tested", "measured", "collected", "ordered", "prepared", "cooked", "served",
    "taught", "learned", "told", "showed", "sent", "received", "lost", "won", "saved", "spent",
)
ESSAY_ADJECTIVES = (
    "busy", "careful", "cheerful", "crowded", "distant", "empty", "famous", "friendly", "heavy", "honest",
    "important", "interesting", "late", "long", "modest", "nervous", "open", "patient", "peaceful", "popular",
    "private", "public", "ready", "serious", "short", "strange", "useful", "usual", "wooden", "broken", "clean",
    "dirty", "easy", "hard", "free", "full", "good", "great", "high", "low", "new", "next", "nice", "poor",
    "real", "safe", "sure", "true", "whole", "wide", "local", "final", "recent",
)
ESSAY_ADVERBS = (
    "slowly", "quietly", "carefully", "often", "always", "rarely", "finally", "suddenly", "gladly", "easily",
    "soon", "later", "together", "again", "today", "yesterday", "usually", "sometimes",
)
ESSAY_PREPOSITIONS = (
    "near", "behind", "across", "under", "beside", "inside", "around", "along", "beyond", "toward", "over",
    "through", "from", "into", "with", "without", "after", "before",
)
ESSAY_PATTERNS = (
    "the {a} {n} {v} the {n} {p} the {n}.",
    "{adv}, the {n} {v} a {a} {n}.",
    "a {a} {n} {v} the {n} {adv}.",
    "the {n} and the {n} {v} the {a} {n} {p} the {n}.",
    "every {n} {v} a {n} {p} the {a} {n}.",
    "the {n} {v} {adv}.",
)
ESSAY_BLOCK = 512  # essay sentences are generated and tokenized in blocks of this many
ESSAY_STARTS = 10_000  # a sample's essay starts at a seeded sentence index below this
CWE_WORDS = tuple(dict.fromkeys(KEY_NOUNS + KEY_ADJECTIVES + ESSAY_NOUNS + ESSAY_ADJECTIVES))
_SYLLABLES = tuple(c + v for c in "bdfgklmnprstvz" for v in "aeiou")


class LengthTooShortError(ValueError):
    """The requested length cannot hold the task's fixed parts; `.needed` is the smallest length that can."""

    def __init__(self, task: str, length: int, needed: int):
        super().__init__(f"length {length} is too short for {task}: needs at least {needed} tokens")
        self.task, self.length, self.needed = task, length, needed


@dataclass
class Sample:
    task: str
    input_ids: list[int]  # the whole prompt, exactly `length` tokens, ending with the answer prefix
    prompt: str  # tokenizer.decode(input_ids, skip_special_tokens=True)
    answers: list[str]
    length: int
    depth: float | None  # requested (or drawn) depth of the first asked needle; None for vt, cwe, fwe
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        return cls(**d)


class SuiteSamples(list):
    """A list of Sample; `.not_run` maps "task" or "task@length" to why it has no samples."""

    def __init__(self, samples=(), not_run: dict[str, str] | None = None):
        super().__init__(samples)
        self.not_run: dict[str, str] = dict(not_run or {})


# ---------------------------------------------------------------------------------------------------------------
# Tokenization: pieces encoded separately, cached per tokenizer


class _Tok:
    """Per-tokenizer state: BOS to prepend, whether to drop a piece's leading space, caches."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        plain = tokenizer("the", add_special_tokens=False)["input_ids"]
        spaced = tokenizer(" the", add_special_tokens=False)["input_ids"]
        first = tokenizer.convert_ids_to_tokens(plain[:1])
        # Tokenizers that prefix a space themselves (or ignore spaces) would read " x" as two spaces.
        self.strip_space = plain == spaced or bool(first and str(first[0])[:1] in ("\u2581", "\u0120", " "))
        with_special = tokenizer("the")["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos = [bos] if bos is not None and with_special[:1] == [bos] and plain[:1] != [bos] else []
        self.memo: dict[str, list[int]] = {}
        self.blocks: dict[tuple, list[list[int]]] = {}

    def encode(self, texts: list[str], memo: bool = True) -> list[list[int]]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.memo)) if memo else texts
        if missing:
            raw = [t[1:] if self.strip_space and t.startswith(" ") else t for t in missing]
            ids = self.tokenizer(raw, add_special_tokens=False)["input_ids"]
            if not memo:
                return [list(x) for x in ids]
            self.memo.update(zip(missing, (list(x) for x in ids)))
        return [self.memo[t] for t in texts]

    def one(self, text: str, memo: bool = False) -> list[int]:
        return self.encode([text], memo=memo)[0]

    def block(self, key: tuple, make_texts) -> list[list[int]]:
        if key not in self.blocks:
            self.blocks[key] = [ids for ids in self.encode(make_texts(), memo=False) if ids]
        return self.blocks[key]


_TOKS: dict[int, _Tok] = {}


def _tok(tokenizer) -> _Tok:
    t = _TOKS.get(id(tokenizer))
    if t is None or t.tokenizer is not tokenizer:
        t = _TOKS[id(tokenizer)] = _Tok(tokenizer)
        try:
            weakref.finalize(tokenizer, _TOKS.pop, id(tokenizer), None)
        except TypeError:  # not weak-referenceable: the cache keeps it alive
            pass
    return t


# ---------------------------------------------------------------------------------------------------------------
# Haystacks and random strings


def _essay_block(b: int) -> list[str]:
    rng = random.Random(f"hylo_lab.essay:{b}")
    slots = dict(n=ESSAY_NOUNS, v=ESSAY_VERBS, a=ESSAY_ADJECTIVES, adv=ESSAY_ADVERBS, p=ESSAY_PREPOSITIONS)
    out = []
    for _ in range(ESSAY_BLOCK):
        pattern = rng.choice(ESSAY_PATTERNS)
        text = re.sub(r"\{(\w+)\}", lambda m: rng.choice(slots[m.group(1)]), pattern)
        text = re.sub(r"\ba (?=[aeiou])", "an ", text)
        out.append(" " + text[0].upper() + text[1:])
    return out


def _file_sentences(path: Path) -> list[str]:
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    text = " ".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    sentences = [" " + s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s]
    if not sentences:
        raise ValueError(f"haystack {str(path)!r} holds no text")
    return sentences


def _haystack_stream(t: _Tok, kind: str, rng: random.Random):
    """(endless iterator of sentence ids, start index, haystack name for meta)."""
    if kind == "noise":
        ids = t.block(("noise",), lambda: [" " + s for s in NOISE_SENTENCES])
        start = rng.randrange(len(ids))
        return (ids[i % len(ids)] for i in itertools.count(start)), start, "noise"
    if kind == "essay":
        start = rng.randrange(ESSAY_STARTS)

        def essay():
            b, off = divmod(start, ESSAY_BLOCK)
            while True:
                yield from t.block(("essay", b), lambda b=b: _essay_block(b))[off:]
                b, off = b + 1, 0

        return essay(), start, "essay"
    path = Path(kind)
    if not path.exists():
        raise ValueError(f"haystack must be 'noise', 'essay' or a path to a .txt file or directory; got {kind!r}")
    st = path.stat()
    ids = t.block(("file", str(path.resolve()), st.st_mtime_ns, st.st_size), lambda: _file_sentences(path))
    if not ids:
        raise ValueError(f"haystack {kind!r} holds no text")
    start = rng.randrange(len(ids))
    return (ids[i % len(ids)] for i in itertools.count(start)), start, str(path)


SYNTHETIC_WORD_BLOCK = 4096  # every caller asks for <= 4096 words: one block, the sequence of seed 0


def _synthetic_words(n: int, _cache: list[str] = []) -> list[str]:  # noqa: B006 - deliberate module cache
    """The first n pronounceable nonsense words (2-3 syllables) of one fixed sequence; none is an English
    word of this module. The sequence grows in whole blocks, block b drawn from its own seed b, so it does not
    depend on which lengths were asked for before (a process that first asked for 300 words gets the same
    4096 as a fresh one)."""
    seen = None
    while len(_cache) < n:
        if seen is None:
            seen = set(_cache) | set(CWE_WORDS)
        block = len(_cache) // SYNTHETIC_WORD_BLOCK
        rng = random.Random(f"hylo_lab.synthetic:{block}")
        end = (block + 1) * SYNTHETIC_WORD_BLOCK
        while len(_cache) < end:
            w = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
            if w not in seen:
                seen.add(w)
                _cache.append(w)
    return _cache[:n]


def _random_string(rng: random.Random, kind: str, num_digits: int) -> str:
    if kind == "number":
        return str(rng.randrange(10 ** (num_digits - 1), 10 ** num_digits))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def _pool_size(kind: str, num_digits: int) -> float:
    if kind == "number":
        return 9 * 10 ** (num_digits - 1)
    return math.inf if kind == "uuid" else len(KEY_ADJECTIVES) * len(KEY_NOUNS)


def _draw_distinct(rng, kind: str, n: int, taken: set, num_digits: int) -> list[str]:
    if n > _pool_size(kind, num_digits) - len(taken):
        raise ValueError(f"cannot draw {n} distinct {kind} strings (num_digits={num_digits})")
    out = []
    while len(out) < n:
        x = _random_string(rng, kind, num_digits)
        if x not in taken:
            taken.add(x)
            out.append(x)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Assembly: fill a haystack to an exact token budget, insert needles at piece boundaries


def _fill(stream, budget: int) -> list[list[int]]:
    pieces, total = [], 0
    for ids in stream:
        if not ids:
            continue
        if total + len(ids) >= budget:
            pieces.append(ids[: budget - total])
            return pieces
        pieces.append(ids)
        total += len(ids)
    raise RuntimeError("haystack stream ended")  # streams are endless


def _assemble(task, length, head, stream, needles, depths, tail):
    """head + haystack (exact budget) with needles[j] at the boundary nearest depths[j] + tail.

    Returns input_ids, needle spans [start, end) in input_ids, realised depths, haystack tokens, pieces."""
    fixed = len(head) + sum(map(len, needles)) + len(tail)
    budget = length - fixed
    if budget < 1:
        raise LengthTooShortError(task, length, fixed + 1)
    pieces = _fill(stream, budget)
    bounds = list(itertools.accumulate(map(len, pieces), initial=0))
    slots = []
    for d in depths:
        i = bisect.bisect_left(bounds, d * budget)
        slots.append(i if i == 0 or bounds[i] - d * budget < d * budget - bounds[i - 1] else i - 1)
    ids, spans, done = list(head), [None] * len(needles), 0
    for j in sorted(range(len(needles)), key=lambda j: (slots[j], j)):
        for piece in pieces[done:slots[j]]:
            ids += piece
        done = max(done, slots[j])
        spans[j] = [len(ids), len(ids) + len(needles[j])]
        ids += needles[j]
    for piece in pieces[done:]:
        ids += piece
    ids += tail
    assert len(ids) == length, (len(ids), length)
    return ids, spans, [bounds[s] / budget for s in slots], budget, len(pieces)


def _finish(task, t: _Tok, ids, answers, length, depth, meta) -> Sample:
    sample = Sample(task=task, input_ids=ids, prompt=t.tokenizer.decode(ids, skip_special_tokens=True),
                    answers=answers, length=length, depth=depth, max_new_tokens=0, meta=meta)
    n = max(len(t.one(" " + a)) for a in answers) if task in QA_TASKS else len(t.one(oracle_answer(sample)))
    sample.max_new_tokens = n + max(4, n // 4)
    return sample


# ---------------------------------------------------------------------------------------------------------------
# The task families


def _niah(task, t: _Tok, length, depth, rng, haystack, num_distractors, num_digits):
    spec = NIAH_SPECS[task]
    v, vs = TYPE_NAMES[spec["value"]]
    n_distractors = spec["distractors"] if num_distractors is None else num_distractors
    n_keys = spec["queries"] + n_distractors
    keys = _draw_distinct(rng, spec["key"], n_keys, set(), num_digits)
    taken_values: set = set()
    values = [_draw_distinct(rng, spec["value"], spec["values"] if i < spec["queries"] else 1, taken_values,
                             num_digits) for i in range(n_keys)]
    texts = [NIAH_NEEDLE.format(v=v, key=k, value=x) for k, vals in zip(keys, values) for x in vals]
    asked = keys[: spec["queries"]]
    answers = [x for vals in values[: spec["queries"]] for x in vals]
    # As in RULER, the answer prefix restates the needle up to its value, so the answer continues it.
    if spec["queries"] > 1:
        listed = f"{', '.join(asked[:-1])} and {asked[-1]}"
        question, prefix = f"\nWhat are the magic {vs} for {listed}?", f"{ANSWER_PREFIX} The magic {vs} for {listed} are"
    elif spec["values"] > 1:
        question, prefix = f"\nWhat are all the magic {vs} for {asked[0]}?", f"{ANSWER_PREFIX} The magic {vs} for {asked[0]} are"
    else:
        question, prefix = f"\nWhat is the magic {v} for {asked[0]}?", f"{ANSWER_PREFIX} The magic {v} for {asked[0]} is"
    drawn = rng.random()  # always drawn, so an explicit depth leaves every other draw unchanged
    depth = drawn if depth is None else depth
    depths = [depth] + [rng.random() for _ in texts[1:]]

    if spec["haystack"] == "needles":
        stream, start, kind = _needle_stream(t, rng, spec, set(keys), taken_values, num_digits), 0, "needles"
    else:
        stream, start, kind = _haystack_stream(t, haystack or spec["haystack"], rng)
    head = t.bos + t.one(NIAH_INTRO.format(vs=vs))
    ids, spans, realised, budget, n_pieces = _assemble(
        task, length, head, stream, t.encode(texts, memo=False), depths, t.one(question + prefix))
    if spec["values"] > 1:  # one key's values: expected in the order they appear (multiquery: as asked)
        answers = [answers[j] for j in sorted(range(len(answers)), key=lambda j: spans[j][0])]
    meta = dict(haystack=kind, haystack_start=start, haystack_tokens=budget, haystack_pieces=n_pieces,
                needle_spans=spans, needle_depths=realised, needles=[x.strip() for x in texts],
                asked_needles=len(answers), keys=asked, key_type=spec["key"], value_type=spec["value"],
                num_distractors=n_distractors, question=question.strip(), answer_prefix=prefix.strip())
    return ids, answers, depth, meta


def _needle_stream(t: _Tok, rng, spec, asked_keys: set, answer_values: set, num_digits):
    """Endless distractor needles: keys never asked ones (and distinct while 90% of the pool is free), values
    never an answer value."""
    key_pool, value_pool = _pool_size(spec["key"], num_digits), _pool_size(spec["value"], num_digits)
    v = TYPE_NAMES[spec["value"]][0]
    used_keys, used_values, batch = set(asked_keys), set(answer_values), 64
    while True:
        texts = []
        for _ in range(batch):
            while True:
                k = _random_string(rng, spec["key"], num_digits)
                if k not in asked_keys and (k not in used_keys or len(used_keys) > 0.9 * key_pool):
                    break
            while True:
                x = _random_string(rng, spec["value"], num_digits)
                if x not in answer_values and (x not in used_values or len(used_values) > 0.9 * value_pool):
                    break
            used_keys.add(k)
            used_values.add(x)
            texts.append(NIAH_NEEDLE.format(v=v, key=k, value=x))
        yield from t.encode(texts, memo=False)
        batch = min(2 * batch, 4096)


def _vt(t: _Tok, length, rng, haystack, num_distractors):
    n_chains = 1 + (num_distractors or 0)
    taken: set = set()
    names = []
    while len(names) < n_chains * (VT_HOPS + 1):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            names.append(name)
    values = _draw_distinct(rng, "number", n_chains, set(), VT_DIGITS)
    texts, depths = [], []
    for c in range(n_chains):
        chain = names[c * (VT_HOPS + 1):(c + 1) * (VT_HOPS + 1)]
        texts += [f" VAR {chain[0]} = {values[c]}."] + [f" VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        depths += sorted(rng.random() for _ in chain)
    answers = names[: VT_HOPS + 1]
    question = f"\nFind all variables that are assigned the value {values[0]}."
    stream, start, kind = _haystack_stream(t, haystack or "noise", rng)
    ids, spans, realised, budget, n_pieces = _assemble(
        "vt", length, t.bos + t.one(VT_INTRO), stream, t.encode(texts, memo=False), depths,
        t.one(question + ANSWER_PREFIX))
    meta = dict(haystack=kind, haystack_start=start, haystack_tokens=budget, haystack_pieces=n_pieces,
                needle_spans=spans, needle_depths=realised, needles=[x.strip() for x in texts], num_chains=n_chains,
                num_hops=VT_HOPS, value=values[0], question=question.strip(), answer_prefix=ANSWER_PREFIX.strip())
    return ids, answers, None, meta


def _bag(task, length, head, tail, counted, candidates):
    """Shared by cwe/fwe: `counted` = [(ids, count)] that must all fit; pad with single candidate words
    until the list is exactly the budget, the last one cut at token level (never into a word of the bag)."""
    budget = length - len(head) - len(tail)
    items = [ids for ids, c in counted for _ in range(c)]
    total = sum(map(len, items))
    if total + 1 > budget:
        raise LengthTooShortError(task, length, len(head) + len(tail) + total + 1)
    in_bag = {tuple(ids) for ids, _ in counted}
    for ids in candidates:
        if total == budget:
            break
        if total + len(ids) <= budget:
            piece = ids
        elif tuple(ids[: budget - total]) not in in_bag:
            piece = ids[: budget - total]
        else:
            continue
        items.append(piece)
        in_bag.add(tuple(piece))
        total += len(piece)
    return items, budget


def _word_candidates(t: _Tok, rng, first: list[str]):
    """ids of " word" for `first`, then synthetic words in seeded order, chunk by chunk (endless)."""
    yield from t.encode([" " + w for w in first])
    for c in itertools.count():
        chunk = _synthetic_words((c + 1) * 1024)[c * 1024:]
        rng.shuffle(chunk)
        yield from t.encode([" " + w for w in chunk])


def _cwe(t: _Tok, length, rng):
    words = list(CWE_WORDS)
    rng.shuffle(words)
    lens = [len(x) for x in t.encode([" " + w for w in words])]
    head = t.bos + t.one(CWE_INTRO)
    tail_for = lambda k: t.one(CWE_QUESTION.format(k=k) + ANSWER_PREFIX, memo=True)  # noqa: E731
    n_est = max(0, length - len(head) - len(tail_for(10))) * len(lens) // max(1, sum(lens))  # list words
    if n_est >= 2 * CWE_FREQ[0] * CWE_FREQ[1]:
        num_cw, freq_cw, freq_ucw = CWE_FREQ
    else:  # shorter lists: fewer, rarer common words; common words fill about half the list
        num_cw = max(1, min(10, n_est // 12))
        freq_cw, freq_ucw = max(2, min(30, n_est // (2 * num_cw))), 1
    while True:  # shrink the plan until the common words leave room (else _bag says what length is needed)
        budget = length - len(head) - len(tail_for(num_cw))
        if freq_cw * sum(lens[:num_cw]) < budget:
            break
        if freq_cw > freq_ucw + 1:
            freq_cw -= 1
        elif num_cw > 1:
            num_cw -= 1
        else:
            break
    common = t.encode([" " + w for w in words[:num_cw]])
    uncommon, used = [], freq_cw * sum(map(len, common))
    cands = _word_candidates(t, rng, words[num_cw:])
    for ids in cands:  # uncommon words freq_ucw times each while they fit; the rest of the list is padding
        if used + freq_ucw * len(ids) > budget:
            cands = itertools.chain([ids], cands)
            break
        uncommon.append(ids)
        used += freq_ucw * len(ids)
    # The last uncommon word joins the padding, so the counted words always leave at least one token free.
    counted = [(ids, freq_cw) for ids in common] + [(ids, freq_ucw) for ids in uncommon[:-1]]
    tail = tail_for(num_cw)
    items, budget = _bag("cwe", length, head, tail, counted, itertools.chain(uncommon[-1:] * freq_ucw, cands))
    rng.shuffle(items)
    ids = head + [i for item in items for i in item] + tail
    meta = dict(num_cw=num_cw, freq_cw=freq_cw, freq_ucw=freq_ucw, num_ucw=len(uncommon), list_words=len(items),
                list_span=[len(head), len(head) + budget], question=CWE_QUESTION.format(k=num_cw).strip(),
                answer_prefix=ANSWER_PREFIX.strip())
    return ids, words[:num_cw], None, meta


def _fwe(t: _Tok, length, rng):
    words = rng.sample(_synthetic_words(4096), 4096)
    lens = [len(x) for x in t.encode([" " + w for w in words])]
    head = t.bos + t.one(FWE_INTRO)
    tail = t.one(FWE_QUESTION + ANSWER_PREFIX)
    budget = length - len(head) - len(tail)
    zeta = sum(r ** -FWE_ALPHA for r in range(1, 100_000))

    def counts(n):  # expected Zipf counts of n words, top 3 forced strictly above the 4th
        c = []
        for r in itertools.count(1):
            x = math.floor(n * r ** -FWE_ALPHA / zeta + 0.5)
            if x == 0 and r > 4:
                break
            c.append(x)
        c[2] = max(c[2], 2, c[3] + 1)
        c[1], c[0] = max(c[1], c[2]), max(c[0], c[1], c[2])
        return [x for x in c if x > 0]

    tokens = lambda n: sum(x * k for x, k in zip(counts(n), lens))  # noqa: E731
    lo, hi = 1, max(1, budget)
    while lo < hi:  # the largest n whose counts leave room for at least one padding token
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if tokens(mid) < budget else (lo, mid - 1)
    c = counts(lo)
    ids = t.encode([" " + w for w in words])
    items, budget = _bag("fwe", length, head, tail, list(zip(ids, c)), iter(ids[len(c):]))
    rng.shuffle(items)
    input_ids = head + [i for item in items for i in item] + tail
    meta = dict(alpha=FWE_ALPHA, top_counts=c[:4], list_words=len(items), list_span=[len(head), len(head) + budget],
                question=FWE_QUESTION.strip(), answer_prefix=ANSWER_PREFIX.strip())
    return input_ids, words[:3], None, meta


_QA_CACHE: dict[tuple, list[dict]] = {}


def load_qa_records(path) -> list[dict]:
    """Read a QA jsonl (format in the module docstring) -> [{"paragraphs", "question", "answers"}]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"qa_file {str(path)!r} is not a file")
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _QA_CACHE:
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            r = json.loads(line)
            paragraphs = [r["context"]] if "context" in r else r.get("paragraphs")
            answers = [r["answers"]] if isinstance(r.get("answers"), str) else r.get("answers")
            valid = (isinstance(paragraphs, list) and paragraphs and all(isinstance(p, str) for p in paragraphs)
                     and isinstance(answers, list) and answers and isinstance(r.get("question"), str)
                     and not ("context" in r and "paragraphs" in r))
            if not valid:
                raise ValueError(f"{path}:{n}: a QA record needs 'question', non-empty 'answers' and exactly one of "
                                 "'context' (str) or 'paragraphs' (list of str)")
            records.append(dict(paragraphs=[" ".join(p.split()) for p in paragraphs], question=r["question"].strip(),
                                answers=[str(a) for a in answers]))
        if not records:
            raise ValueError(f"qa_file {str(path)!r} holds no records")
        _QA_CACHE[key] = records
    return _QA_CACHE[key]


def _qa(task, t: _Tok, length, depth, rng, seed, qa_file):
    records = load_qa_records(qa_file)
    index = seed % len(records)
    record = records[index]
    gold = set(record["paragraphs"])
    pool = list(dict.fromkeys(p for r in records for p in r["paragraphs"] if p not in gold))
    if not pool:
        raise ValueError(f"qa_file {str(qa_file)!r} needs paragraphs of other records as distractor documents")
    rng.shuffle(pool)
    docs = t.encode([QA_DOCUMENT.format(text=p) for p in pool])
    stream = (docs[i % len(docs)] for i in itertools.count())
    drawn = rng.random()
    depth = drawn if depth is None else depth
    needles = t.encode([QA_DOCUMENT.format(text=p) for p in record["paragraphs"]])
    depths = [depth] + [rng.random() for _ in needles[1:]]
    question = QA_QUESTION.format(question=record["question"])
    ids, spans, realised, budget, n_pieces = _assemble(
        task, length, t.bos + t.one(QA_INTRO), stream, needles, depths, t.one(question + ANSWER_PREFIX))
    meta = dict(haystack="documents", qa_file=str(qa_file), record=index, haystack_tokens=budget,
                haystack_pieces=n_pieces, needle_spans=spans, needle_depths=realised,
                question=question.strip(), answer_prefix=ANSWER_PREFIX.strip())
    return ids, list(record["answers"]), depth, meta


# ---------------------------------------------------------------------------------------------------------------
# Public API


def _check_task(task) -> None:
    if task not in RULER_TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(RULER_TASKS)}")


def generate_sample(task: str, tokenizer, length: int, *, depth: float | None = None, seed: int = 0,
                    haystack: str | None = None, qa_file: str | None = None, num_distractors: int | None = None,
                    num_digits: int = 7) -> Sample:
    """One sample of `task`, exactly `length` tokens of `tokenizer` (any HF tokenizer), deterministic in
    (task, length, seed, options). Keys and values depend on (task, seed) only: `length` and `depth` change
    where the asked needle sits and how much haystack surrounds it, not what it says.

    haystack: None (the task's own), "noise", "essay", or a path to a .txt file / directory of .txt files;
    ignored by tasks without a text haystack (niah_multikey_2/3, cwe, fwe, qa_*).
    qa_file: a jsonl of QA records (module docstring), required by qa_1/qa_2.
    num_distractors: extra needles with other keys (niah_single_*, niah_multikey_1, niah_multivalue,
    niah_multiquery) or extra chains (vt); None = the task's default (3 for niah_multikey_1, else 0).
    num_digits: digits of the numbers of niah tasks (RULER: 7). Raises LengthTooShortError (a ValueError,
    `.needed` = the minimum) when the fixed parts do not fit; `min_length` computes that minimum.
    """
    _check_task(task)
    if isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1:
        raise ValueError(f"length must be a positive int; got {length!r}")
    length = int(length)
    if depth is not None:
        if task not in DEPTH_TASKS:
            raise ValueError(f"depth applies to niah_* and qa_* tasks only, not {task}; pass depth=None")
        if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be a number in [0, 1]; got {depth!r}")
        depth = float(depth)
    if num_distractors is not None and (task not in ("vt",) + NIAH_TASKS or NIAH_SPECS.get(task, {}).get(
            "haystack") == "needles" or isinstance(num_distractors, bool) or not isinstance(num_distractors, int)
            or num_distractors < 0):
        raise ValueError(f"num_distractors must be None or an int >= 0, for niah tasks with a text haystack or vt; "
                         f"got {num_distractors!r} for {task}")
    if isinstance(num_digits, bool) or not isinstance(num_digits, numbers.Integral) or not 1 <= num_digits <= 18:
        raise ValueError(f"num_digits must be an int in [1, 18]; got {num_digits!r}")
    if task in QA_TASKS and not qa_file:
        raise ValueError(f"{task} needs qa_file: a local jsonl of question/answers/context records")
    if task not in QA_TASKS and qa_file:
        raise ValueError(f"qa_file applies to qa_1 and qa_2 only, not {task}")
    t = _tok(tokenizer)
    rng = random.Random(f"hylo_lab.tasks:{task}:{seed}")  # not the length: same needles at every length
    requested = depth
    if task in NIAH_TASKS:
        ids, answers, depth, meta = _niah(task, t, length, depth, rng, haystack, num_distractors, num_digits)
    elif task == "vt":
        ids, answers, depth, meta = _vt(t, length, rng, haystack, num_distractors)
    elif task == "cwe":
        ids, answers, depth, meta = _cwe(t, length, rng)
    elif task == "fwe":
        ids, answers, depth, meta = _fwe(t, length, rng)
    else:
        ids, answers, depth, meta = _qa(task, t, length, depth, rng, seed, qa_file)
    meta = dict(seed=seed, depth_requested=requested, bos=bool(t.bos), **meta)
    return _finish(task, t, ids, answers, length, depth, meta)


def needle_retrieval_sample(tokenizer, length: int, depth: float, seed: int = 0) -> Sample:
    """The plain needle-in-a-haystack probe: niah_single_1 (noise haystack, word key -> 7-digit number)."""
    return generate_sample("niah_single_1", tokenizer, length, depth=depth, seed=seed)


def min_length(task: str, tokenizer, *, seed: int = 0, **kwargs) -> int:
    """The smallest length at which `generate_sample(task, tokenizer, ., seed=seed, **kwargs)` succeeds
    (it varies slightly with the seed: uuids and numbers tokenize to different lengths)."""
    try:
        generate_sample(task, tokenizer, 1, seed=seed, **kwargs)
    except LengthTooShortError as e:
        lo = e.needed
    else:
        return 1
    for n in itertools.count(lo):  # cwe/fwe shrink their plan with the length; the bound is close
        try:
            generate_sample(task, tokenizer, n, seed=seed, **kwargs)
            return n
        except LengthTooShortError:
            continue


def generate_suite(tasks, tokenizer, lengths, *, num_samples: int = 4, depths=None, seed: int = 0,
                   haystack: str | None = None, qa_file=None, num_digits: int = 7) -> SuiteSamples:
    """Samples for every task x length (x depth for niah_*), seeds seed .. seed+num_samples-1.

    tasks: names, or None for all of RULER_TASKS. depths: None (each niah/qa sample draws its own) or a list
    applied to niah_* tasks (the same seeds at every depth: only the needle moves). haystack: None for each
    task's own, else replaces the "essay" haystack (the natural-text one) of the tasks that use it. qa_file: a
    path used by qa_1 and qa_2, or {task: path}. Returns SuiteSamples (a list) whose `.not_run` records
    skipped tasks ("qa_1": no qa_file) and lengths ("niah_multikey_3@64": too short, needs N tokens).
    """
    tasks = RULER_TASKS if tasks is None else (tasks,) if isinstance(tasks, str) else tuple(tasks)
    for task in tasks:
        _check_task(task)
    lengths = (lengths,) if isinstance(lengths, numbers.Integral) else tuple(lengths)
    out = SuiteSamples()
    for task in tasks:
        path = qa_file.get(task) if isinstance(qa_file, dict) else qa_file
        if task in QA_TASKS and not path:
            out.not_run[task] = "no qa_file given (a local jsonl of question/answers/context records)"
            continue
        kwargs = dict(seed=seed, num_digits=num_digits)
        if task in QA_TASKS:
            kwargs.update(qa_file=path)
        if haystack is not None and NIAH_SPECS.get(task, {}).get("haystack") == "essay":
            kwargs.update(haystack=haystack)
        for length in lengths:
            try:
                for d in depths if depths is not None and task in NIAH_TASKS else [None]:
                    for i in range(num_samples):
                        kwargs.update(seed=seed + i)
                        out.append(generate_sample(task, tokenizer, length, depth=d, **kwargs))
            except LengthTooShortError as e:
                out[:] = [s for s in out if not (s.task == task and s.length == length)]
                out.not_run[f"{task}@{length}"] = str(e)
    return out


def oracle_answer(sample: Sample) -> str:
    """The ideal continuation of the prompt: " a" for QA (the first gold answer), " a, b, c" otherwise."""
    return " " + (sample.answers[0] if sample.task in QA_TASKS else ", ".join(sample.answers))


def _normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def score_sample(task: str, prediction: str, answers: list[str]) -> float:
    """RULER string match: QA 1.0 if any answer is in the prediction, else the fraction of answers found."""
    _check_task(task)
    if not answers:
        raise ValueError("answers is empty")
    pred = _normalise(prediction or "")
    hits = [_normalise(a) in pred for a in answers]
    return float(any(hits)) if task in QA_TASKS else sum(hits) / len(hits)


def save_samples(samples, path) -> None:
    """One JSON object (Sample.to_dict) per line."""
    with open(path, "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s.to_dict()) + "\n")


def load_samples(path) -> list[Sample]:
    with open(path, encoding="utf-8") as f:
        return [Sample.from_dict(json.loads(line)) for line in f if line.strip()]


def tokenizer_corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    """Text covering every template, haystack and string kind of this module, to train a toy tokenizer on."""
    rng = random.Random(f"hylo_lab.tasks.corpus:{seed}")
    lines = [" ".join(NOISE_SENTENCES), " ".join(CWE_WORDS), " ".join(_synthetic_words(300)),
             NIAH_INTRO.format(vs="numbers") + NIAH_INTRO.format(vs="uuids") + VT_INTRO + CWE_INTRO + FWE_INTRO,
             CWE_QUESTION.format(k=10) + FWE_QUESTION + QA_INTRO + QA_QUESTION.format(question="Who?")
             + ANSWER_PREFIX]
    essay = _essay_block(0)
    for i in range(num_lines):
        v = rng.choice(("number", "uuid"))
        key = _random_string(rng, rng.choice(("word", "word", "uuid")), 7)
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        lines.append("".join(essay[(i * 7 + j) % len(essay)] for j in range(4))
                     + NIAH_NEEDLE.format(v=v, key=key, value=_random_string(rng, v, 7))
                     + f" VAR {name} = {_random_string(rng, 'number', 5)}."
                     + f"\nWhat is the magic {v} for {key}?{ANSWER_PREFIX}")
    return lines
