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

import itertools
import json
import numbers
import random
import string

from .generators import cwe, finish, fwe, load_qa_records, niah, oracle_answer, qa, vt
from .text import (ANSWER_PREFIX, CWE_INTRO, CWE_QUESTION, CWE_WORDS, DEPTH_TASKS, FWE_INTRO, FWE_QUESTION,
                   NIAH_INTRO, NIAH_NEEDLE, NIAH_SPECS, NIAH_TASKS, NOISE_SENTENCES, QA_INTRO, QA_QUESTION, QA_TASKS,
                   RULER_TASKS, VT_INTRO, LengthTooShortError, Sample, SuiteSamples, essay_block, random_string,
                   synthetic_words, tok_state)

__all__ = ["DEPTH_TASKS", "NIAH_TASKS", "QA_TASKS", "RULER_TASKS", "LengthTooShortError", "Sample", "SuiteSamples",
           "generate_sample", "generate_suite", "load_qa_records", "load_samples", "min_length",
           "needle_retrieval_sample", "oracle_answer", "save_samples", "score_sample", "tokenizer_corpus"]

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
    t = tok_state(tokenizer)
    rng = random.Random(f"hylo_lab.tasks:{task}:{seed}")  # not the length: same needles at every length
    requested = depth
    if task in NIAH_TASKS:
        ids, answers, depth, meta = niah(task, t, length, depth, rng, haystack, num_distractors, num_digits)
    elif task == "vt":
        ids, answers, depth, meta = vt(t, length, rng, haystack, num_distractors)
    elif task == "cwe":
        ids, answers, depth, meta = cwe(t, length, rng)
    elif task == "fwe":
        ids, answers, depth, meta = fwe(t, length, rng)
    else:
        ids, answers, depth, meta = qa(task, t, length, depth, rng, seed, qa_file)
    meta = dict(seed=seed, depth_requested=requested, bos=bool(t.bos), **meta)
    return finish(task, t, ids, answers, length, depth, meta)


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
    lines = [" ".join(NOISE_SENTENCES), " ".join(CWE_WORDS), " ".join(synthetic_words(300)),
             NIAH_INTRO.format(vs="numbers") + NIAH_INTRO.format(vs="uuids") + VT_INTRO + CWE_INTRO + FWE_INTRO,
             CWE_QUESTION.format(k=10) + FWE_QUESTION + QA_INTRO + QA_QUESTION.format(question="Who?")
             + ANSWER_PREFIX]
    essay = essay_block(0)
    for i in range(num_lines):
        v = rng.choice(("number", "uuid"))
        key = random_string(rng, rng.choice(("word", "word", "uuid")), 7)
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        lines.append("".join(essay[(i * 7 + j) % len(essay)] for j in range(4))
                     + NIAH_NEEDLE.format(v=v, key=key, value=random_string(rng, v, 7))
                     + f" VAR {name} = {random_string(rng, 'number', 5)}."
                     + f"\nWhat is the magic {v} for {key}?{ANSWER_PREFIX}")
    return lines
