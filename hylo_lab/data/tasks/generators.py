"""The five task families (niah_*, vt, cwe, fwe, qa_*): each draws its needles from the seeded rng and returns
(input_ids, answers, depth, meta) of exactly `length` tokens; `finish` turns that into a Sample.
"""

from __future__ import annotations

import itertools
import json
import math
import string
from pathlib import Path

from .text import (ANSWER_PREFIX, CWE_FREQ, CWE_INTRO, CWE_QUESTION, CWE_WORDS, FWE_ALPHA, FWE_INTRO, FWE_QUESTION,
                   NIAH_INTRO, NIAH_NEEDLE, NIAH_SPECS, QA_DOCUMENT, QA_INTRO, QA_QUESTION, QA_TASKS, TYPE_NAMES,
                   VT_DIGITS, VT_HOPS, VT_INTRO, LengthTooShortError, Sample, Tok, assemble, draw_distinct,
                   haystack_stream, pool_size, random_string, synthetic_words)


def oracle_answer(sample: Sample) -> str:
    """The ideal continuation of the prompt: " a" for QA (the first gold answer), " a, b, c" otherwise."""
    return " " + (sample.answers[0] if sample.task in QA_TASKS else ", ".join(sample.answers))


def finish(task, t: Tok, ids, answers, length, depth, meta) -> Sample:
    sample = Sample(task=task, input_ids=ids, prompt=t.tokenizer.decode(ids, skip_special_tokens=True),
                    answers=answers, length=length, depth=depth, max_new_tokens=0, meta=meta)
    n = max(len(t.one(" " + a)) for a in answers) if task in QA_TASKS else len(t.one(oracle_answer(sample)))
    sample.max_new_tokens = n + max(4, n // 4)
    return sample


def niah(task, t: Tok, length, depth, rng, haystack, num_distractors, num_digits):
    spec = NIAH_SPECS[task]
    v, vs = TYPE_NAMES[spec["value"]]
    n_distractors = spec["distractors"] if num_distractors is None else num_distractors
    n_keys = spec["queries"] + n_distractors
    keys = draw_distinct(rng, spec["key"], n_keys, set(), num_digits)
    taken_values: set = set()
    values = [draw_distinct(rng, spec["value"], spec["values"] if i < spec["queries"] else 1, taken_values,
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
        stream, start, kind = haystack_stream(t, haystack or spec["haystack"], rng)
    head = t.bos + t.one(NIAH_INTRO.format(vs=vs))
    ids, spans, realised, budget, n_pieces = assemble(
        task, length, head, stream, t.encode(texts, memo=False), depths, t.one(question + prefix))
    if spec["values"] > 1:  # one key's values: expected in the order they appear (multiquery: as asked)
        answers = [answers[j] for j in sorted(range(len(answers)), key=lambda j: spans[j][0])]
    meta = dict(haystack=kind, haystack_start=start, haystack_tokens=budget, haystack_pieces=n_pieces,
                needle_spans=spans, needle_depths=realised, needles=[x.strip() for x in texts],
                asked_needles=len(answers), keys=asked, key_type=spec["key"], value_type=spec["value"],
                num_distractors=n_distractors, question=question.strip(), answer_prefix=prefix.strip())
    return ids, answers, depth, meta


def _needle_stream(t: Tok, rng, spec, asked_keys: set, answer_values: set, num_digits):
    """Endless distractor needles: keys never asked ones (and distinct while 90% of the pool is free), values
    never an answer value."""
    key_pool, value_pool = pool_size(spec["key"], num_digits), pool_size(spec["value"], num_digits)
    v = TYPE_NAMES[spec["value"]][0]
    used_keys, used_values, batch = set(asked_keys), set(answer_values), 64
    while True:
        texts = []
        for _ in range(batch):
            while True:
                k = random_string(rng, spec["key"], num_digits)
                if k not in asked_keys and (k not in used_keys or len(used_keys) > 0.9 * key_pool):
                    break
            while True:
                x = random_string(rng, spec["value"], num_digits)
                if x not in answer_values and (x not in used_values or len(used_values) > 0.9 * value_pool):
                    break
            used_keys.add(k)
            used_values.add(x)
            texts.append(NIAH_NEEDLE.format(v=v, key=k, value=x))
        yield from t.encode(texts, memo=False)
        batch = min(2 * batch, 4096)


def vt(t: Tok, length, rng, haystack, num_distractors):
    n_chains = 1 + (num_distractors or 0)
    taken: set = set()
    names = []
    while len(names) < n_chains * (VT_HOPS + 1):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in taken:
            taken.add(name)
            names.append(name)
    values = draw_distinct(rng, "number", n_chains, set(), VT_DIGITS)
    texts, depths = [], []
    for c in range(n_chains):
        chain = names[c * (VT_HOPS + 1):(c + 1) * (VT_HOPS + 1)]
        texts += [f" VAR {chain[0]} = {values[c]}."] + [f" VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        depths += sorted(rng.random() for _ in chain)
    answers = names[: VT_HOPS + 1]
    question = f"\nFind all variables that are assigned the value {values[0]}."
    stream, start, kind = haystack_stream(t, haystack or "noise", rng)
    ids, spans, realised, budget, n_pieces = assemble(
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


def _word_candidates(t: Tok, rng, first: list[str]):
    """ids of " word" for `first`, then synthetic words in seeded order, chunk by chunk (endless)."""
    yield from t.encode([" " + w for w in first])
    for c in itertools.count():
        chunk = synthetic_words((c + 1) * 1024)[c * 1024:]
        rng.shuffle(chunk)
        yield from t.encode([" " + w for w in chunk])


def cwe(t: Tok, length, rng):
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


def fwe(t: Tok, length, rng):
    words = rng.sample(synthetic_words(4096), 4096)
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


def qa(task, t: Tok, length, depth, rng, seed, qa_file):
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
    ids, spans, realised, budget, n_pieces = assemble(
        task, length, t.bos + t.one(QA_INTRO), stream, needles, depths, t.one(question + ANSWER_PREFIX))
    meta = dict(haystack="documents", qa_file=str(qa_file), record=index, haystack_tokens=budget,
                haystack_pieces=n_pieces, needle_spans=spans, needle_depths=realised,
                question=question.strip(), answer_prefix=ANSWER_PREFIX.strip())
    return ids, list(record["answers"]), depth, meta
