"""The pieces RULER-style prompts are made of (the package docstring says how they are put together): task
tables, templates and vocabularies; `Sample`; per-tokenizer encoding (`tok_state`); haystack streams; seeded
random keys and values; and `assemble`, which fills a haystack to an exact token budget around the needles.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import re
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


# Tokenization: pieces encoded separately, cached per tokenizer


class Tok:
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


_TOKS: dict[int, Tok] = {}


def tok_state(tokenizer) -> Tok:
    t = _TOKS.get(id(tokenizer))
    if t is None or t.tokenizer is not tokenizer:
        t = _TOKS[id(tokenizer)] = Tok(tokenizer)
        try:
            weakref.finalize(tokenizer, _TOKS.pop, id(tokenizer), None)
        except TypeError:  # not weak-referenceable: the cache keeps it alive
            pass
    return t


# Haystacks and random strings


def essay_block(b: int) -> list[str]:
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


def haystack_stream(t: Tok, kind: str, rng: random.Random):
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
                yield from t.block(("essay", b), lambda b=b: essay_block(b))[off:]
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


def synthetic_words(n: int, _cache: list[str] = []) -> list[str]:  # noqa: B006 - deliberate module cache
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


def random_string(rng: random.Random, kind: str, num_digits: int) -> str:
    if kind == "number":
        return str(rng.randrange(10 ** (num_digits - 1), 10 ** num_digits))
    if kind == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"


def pool_size(kind: str, num_digits: int) -> float:
    if kind == "number":
        return 9 * 10 ** (num_digits - 1)
    return math.inf if kind == "uuid" else len(KEY_ADJECTIVES) * len(KEY_NOUNS)


def draw_distinct(rng, kind: str, n: int, taken: set, num_digits: int) -> list[str]:
    if n > pool_size(kind, num_digits) - len(taken):
        raise ValueError(f"cannot draw {n} distinct {kind} strings (num_digits={num_digits})")
    out = []
    while len(out) < n:
        x = random_string(rng, kind, num_digits)
        if x not in taken:
            taken.add(x)
            out.append(x)
    return out


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


def assemble(task, length, head, stream, needles, depths, tail):
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
