import json
import math
import os
import re
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from hylo_lab.data import tasks  # noqa: E402
from hylo_lab.data.tasks import LengthTooShortError  # noqa: E402


def _wrap(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)


@pytest.fixture(scope="module")
def byte_tok():
    """GPT-2-style byte-level BPE, 1000 tokens, no automatic BOS: pieces keep their leading space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tasks.tokenizer_corpus(300), trainer=trainer)
    return _wrap(tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def sp_tok():
    """SentencePiece-like BPE (Metaspace, prefix space added by the tokenizer), 600 tokens, adds BOS itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(tasks.tokenizer_corpus(300), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _wrap(tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


QA_RECORDS = [
    dict(context="The old lighthouse on the north shore was painted red in the spring.",
         question="What colour was the lighthouse painted?", answers=["red"]),
    dict(context="Mara planted forty apple trees behind the school last autumn.",
         question="How many apple trees did Mara plant?", answers=["forty", "40"]),
    dict(context="The river market opens at dawn and closes before the evening bell.",
         question="When does the river market open?", answers="at dawn"),
    dict(paragraphs=["Tobin was born in the town of Ashby.", "Ashby lies on the banks of the Silver river."],
         question="On which river lies the town where Tobin was born?", answers=["Silver", "the Silver river"]),
    dict(paragraphs=["The blue kite belongs to Nina.", "Nina keeps her toys in the wooden barn."],
         question="Where is the blue kite kept?", answers=["in the wooden barn", "wooden barn"]),
]


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA_RECORDS))
    return str(path)


def _kwargs(task, qa_file):
    return dict(qa_file=qa_file) if task in tasks.QA_TASKS else {}


def test_task_names():
    assert len(tasks.RULER_TASKS) == 13 and tasks.RULER_TASKS[-2:] == ("qa_1", "qa_2")
    assert tasks.NIAH_TASKS == tuple(t for t in tasks.RULER_TASKS if t.startswith("niah_"))
    assert tasks.RULER_TASKS[8:11] == ("vt", "cwe", "fwe")


# 128 is below the minimum of the uuid / multi-needle tasks with these small vocabularies (a clear error is
# expected there), 300 and 1000 are typical toy lengths, 4096 reaches RULER's full cwe plan (10 x 30, 3).
@pytest.mark.parametrize("length", [128, 300, 1000, 4096])
@pytest.mark.parametrize("tok_name", ["byte_tok", "sp_tok"])
@pytest.mark.parametrize("task", tasks.RULER_TASKS)
def test_exact_length_every_task(task, tok_name, length, qa_file, request):
    tok = request.getfixturevalue(tok_name)
    kw = _kwargs(task, qa_file)
    depths = [0.0, 0.37, 1.0] if task in tasks.DEPTH_TASKS else [None]
    needed = tasks.min_length(task, tok, seed=3, **kw)
    for depth in depths:
        if length < needed:
            with pytest.raises(LengthTooShortError, match=f"needs at least {needed} tokens"):
                tasks.generate_sample(task, tok, length, depth=depth, seed=3, **kw)
            continue
        s = tasks.generate_sample(task, tok, length, depth=depth, seed=3, **kw)
        assert len(s.input_ids) == s.length == length
        assert all(isinstance(i, int) for i in s.input_ids)
        assert (s.input_ids[0] == tok.bos_token_id) == (tok_name == "sp_tok") == s.meta["bos"]
        assert s.prompt.endswith(s.meta["answer_prefix"]) and "Answer:" in s.meta["answer_prefix"]
        assert s.depth == depth if depth is not None else (s.depth is None) == (task not in tasks.DEPTH_TASKS)
        assert s.answers and s.max_new_tokens >= len(tok.encode(tasks.oracle_answer(s), add_special_tokens=False))
        json.dumps(s.meta)
        for (a, b), text in zip(s.meta.get("needle_spans", []), s.meta.get("needles", [])):
            assert tok.decode(s.input_ids[a:b]).strip() == text
    # the minimum is exact: one token less fails
    if needed > 1:
        with pytest.raises(LengthTooShortError):
            tasks.generate_sample(task, tok, needed - 1, seed=3, **kw)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_needle_sits_at_requested_depth(task, byte_tok):
    length = 2000
    for depth in [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]:
        s = tasks.generate_sample(task, byte_tok, length, depth=depth, seed=5)
        (a, b), realised, budget = s.meta["needle_spans"][0], s.meta["needle_depths"][0], s.meta["haystack_tokens"]
        intro = len(byte_tok.encode(tasks.NIAH_INTRO.format(vs="numbers"), add_special_tokens=False))
        assert a - intro == round(realised * budget)  # haystack tokens before the needle
        # a sentence (or a needle of the haystack) is < 30 tokens: the needle is within half of one
        assert abs(realised - depth) * budget <= 15
        if depth == 0.0:
            assert a == intro
        if depth == 1.0:
            assert b == length - len(byte_tok.encode(s.meta["question"] + "\n" + s.meta["answer_prefix"], add_special_tokens=False)) - 1
        assert byte_tok.decode(s.input_ids[a:b]) == " " + s.meta["needles"][0]


def test_multi_needle_layout(byte_tok):
    s = tasks.generate_sample("niah_multikey_1", byte_tok, 1500, depth=0.5, seed=2)
    assert len(s.meta["needle_spans"]) == 4 and s.answers[0] in s.meta["needles"][0]
    assert all(s.meta["keys"][0] not in n for n in s.meta["needles"][1:])
    s = tasks.generate_sample("niah_multivalue", byte_tok, 1500, seed=2)
    assert len(s.answers) == 4 == len(set(s.answers))
    assert s.answers == re.findall(rf"magic number for {s.meta['keys'][0]} is (\d+)", s.prompt)  # text order
    s = tasks.generate_sample("niah_multiquery", byte_tok, 1500, seed=2)
    assert len(s.meta["keys"]) == 4 and re.findall(r"[a-z]+-[a-z]+", s.meta["question"]) == s.meta["keys"]
    assert s.answers == [re.search(rf"magic number for {k} is (\d+)", s.prompt).group(1) for k in s.meta["keys"]]
    s = tasks.generate_sample("niah_multikey_2", byte_tok, 1500, seed=2)  # all needles: one per key
    keys = re.findall(r"magic number for (\S+) is", s.prompt[: s.prompt.rindex("\nWhat")])  # needles only
    assert len(keys) > 20 and len(set(keys)) == len(keys) and s.meta["keys"][0] in keys
    s = tasks.generate_sample("niah_multikey_1", byte_tok, 1500, seed=2, num_distractors=6)
    assert len(s.meta["needle_spans"]) == 7


def test_vt_chain_in_order(byte_tok):
    s = tasks.generate_sample("vt", byte_tok, 1000, seed=4)
    starts = [a for a, _ in s.meta["needle_spans"]]
    assert starts == sorted(starts) and len(s.answers) == 5
    chain = re.findall(r"VAR (\w+) = (?:VAR )?(\w+)\.", s.prompt)
    assert chain[0] == (s.answers[0], s.meta["value"])
    assert chain[1:] == list(zip(s.answers[1:], s.answers[:-1]))
    s = tasks.generate_sample("vt", byte_tok, 1000, seed=4, num_distractors=2)
    assert len(s.meta["needle_spans"]) == 15 and len(s.answers) == 5


@pytest.mark.parametrize("length", [128, 1000, 4096])
def test_cwe_fwe_answers_are_the_most_frequent(length, byte_tok):
    for task in ["cwe", "fwe"]:
        s = tasks.generate_sample(task, byte_tok, length, seed=7)
        a, b = s.meta["list_span"]
        counts = Counter(byte_tok.decode(s.input_ids[a:b]).split())
        k = len(s.answers)
        top = {w for w, _ in counts.most_common(k)}
        assert top == set(s.answers)
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    if length == 4096:
        cwe = tasks.generate_sample("cwe", byte_tok, length, seed=7)
        assert (cwe.meta["num_cw"], cwe.meta["freq_cw"], cwe.meta["freq_ucw"]) == (10, 30, 3)


def test_scoring_by_hand():
    assert tasks.score_sample("niah_single_1", "The number is 1234567.", ["1234567"]) == 1.0
    assert tasks.score_sample("niah_multivalue", "12, 34", ["12", "34", "56", "78"]) == 0.5
    assert tasks.score_sample("niah_single_3", "ABCD-EF", ["abcd-ef"]) == 1.0  # case-insensitive
    assert tasks.score_sample("vt", "nothing here", ["ABCDE", "FGHIJ"]) == 0.0
    assert tasks.score_sample("cwe", "apple\nbanana", ["apple", "banana", "cherry"]) == pytest.approx(2 / 3)
    assert tasks.score_sample("qa_1", "It was in the wooden\n barn.", ["the barn", "wooden barn"]) == 1.0
    assert tasks.score_sample("qa_2", "no idea", ["Silver", "the Silver river"]) == 0.0
    assert tasks.score_sample("fwe", "", ["a", "b", "c"]) == 0.0
    with pytest.raises(ValueError, match="answers is empty"):
        tasks.score_sample("cwe", "x", [])


@pytest.mark.parametrize("tok_name", ["byte_tok", "sp_tok"])
def test_oracle_scores_one_and_empty_scores_zero(tok_name, qa_file, request):
    tok = request.getfixturevalue(tok_name)
    for task in tasks.RULER_TASKS:
        for seed in range(3):
            s = tasks.generate_sample(task, tok, 1000, seed=seed, **_kwargs(task, qa_file))
            assert tasks.score_sample(task, tasks.oracle_answer(s), s.answers) == 1.0
            assert tasks.score_sample(task, "", s.answers) == 0.0


def test_qa_not_run_without_file_and_run_with_one(byte_tok, qa_file):
    suite = tasks.generate_suite(None, byte_tok, [300], num_samples=2)
    assert set(suite.not_run) == {"qa_1", "qa_2"} and "qa_file" in suite.not_run["qa_1"]
    assert isinstance(suite, list) and {s.task for s in suite} == set(tasks.RULER_TASKS) - {"qa_1", "qa_2"}

    suite = tasks.generate_suite(["qa_1", "qa_2"], byte_tok, [300, 600], num_samples=5, qa_file=qa_file)
    assert not suite.not_run and len(suite) == 20
    for s in suite:
        record = QA_RECORDS[s.meta["seed"] % len(QA_RECORDS)]
        gold = [record["context"]] if "context" in record else record["paragraphs"]
        assert all(f"Document: {p}" in s.prompt for p in gold) and record["question"] in s.prompt
        assert s.answers == ([record["answers"]] if isinstance(record["answers"], str) else record["answers"])
        assert s.prompt.count("Document:") > len(gold)  # distractor documents from other records
    one = tasks.generate_suite(["qa_2"], byte_tok, [300], num_samples=1, qa_file={"qa_2": qa_file})
    assert len(one) == 1 and not one.not_run


def test_suite_grid_and_too_short_lengths(byte_tok):
    # at 80 tokens niah_single_1 (needs ~60 here) and cwe (~70) fit, niah_multikey_3 (~125) does not
    suite = tasks.generate_suite(["niah_single_1", "niah_multikey_3", "cwe"], byte_tok, [80, 400],
                                 num_samples=2, depths=[0.0, 0.5, 1.0])
    assert list(suite.not_run) == ["niah_multikey_3@80"] and "too short" in suite.not_run["niah_multikey_3@80"]
    assert {(s.task, s.length) for s in suite} == {("niah_single_1", 80), ("niah_single_1", 400),
                                                   ("niah_multikey_3", 400), ("cwe", 80), ("cwe", 400)}
    grid = [s for s in suite if s.task == "niah_single_1" and s.length == 400]
    assert sorted((s.depth, s.meta["seed"]) for s in grid) == [(d, i) for d in (0.0, 0.5, 1.0) for i in (0, 1)]
    # same seed at another depth: the same needle, moved
    assert len({tuple(s.answers) for s in grid if s.meta["seed"] == 0}) == 1
    assert sum(s.task == "cwe" for s in suite) == 4 and all(s.depth is None for s in suite if s.task == "cwe")


def test_deterministic_by_seed(byte_tok, qa_file):
    for task in tasks.RULER_TASKS:
        kw = _kwargs(task, qa_file)
        a = tasks.generate_sample(task, byte_tok, 700, seed=11, **kw)
        b = tasks.generate_sample(task, byte_tok, 700, seed=11, **kw)
        c = tasks.generate_sample(task, byte_tok, 700, seed=12, **kw)
        assert a.to_dict() == b.to_dict()
        assert a.input_ids != c.input_ids


def test_save_load_round_trip(byte_tok, qa_file, tmp_path):
    samples = [tasks.generate_sample(t, byte_tok, 400, seed=1, **_kwargs(t, qa_file)) for t in tasks.RULER_TASKS]
    path = tmp_path / "samples.jsonl"
    tasks.save_samples(samples, path)
    assert len(path.read_text().splitlines()) == 13
    assert tasks.load_samples(path) == samples


def test_local_text_haystack(byte_tok, tmp_path):
    (tmp_path / "a.txt").write_text("Quiet ships sail north. The harbor sleeps at night!\n\nGulls circle the pier.")
    (tmp_path / "b.txt").write_text("Rain falls on the old town. Lanterns glow in windows.")
    for path in [tmp_path / "a.txt", tmp_path]:
        s = tasks.generate_sample("niah_single_2", byte_tok, 500, depth=0.5, seed=0, haystack=str(path))
        assert len(s.input_ids) == 500 and "Gulls circle the pier." in s.prompt and s.meta["haystack"] == str(path)
    assert "Lanterns glow" in s.prompt
    essay = tasks.generate_sample("niah_single_2", byte_tok, 500, seed=0)
    noise = tasks.generate_sample("niah_single_2", byte_tok, 500, seed=0, haystack="noise")
    assert essay.meta["haystack"] == "essay" and "The sky is blue." in noise.prompt
    assert essay.answers == noise.answers


def test_needle_retrieval_sample_is_niah_single_1(byte_tok):
    s = tasks.needle_retrieval_sample(byte_tok, 256, 0.3, seed=9)
    assert s.to_dict() == tasks.generate_sample("niah_single_1", byte_tok, 256, depth=0.3, seed=9).to_dict()
    assert "The grass is green." in s.prompt and re.fullmatch(r"\d{7}", s.answers[0])
    assert re.fullmatch(r"\d{4}", tasks.generate_sample("niah_single_1", byte_tok, 256, num_digits=4).answers[0])


def test_clear_errors(byte_tok):
    with pytest.raises(ValueError, match=r"unknown task 'niah'; valid tasks: niah_single_1, .*qa_2"):
        tasks.generate_sample("niah", byte_tok, 100)
    with pytest.raises(LengthTooShortError, match=r"^length 40 is too short for niah_multikey_3: needs at least \d+"):
        tasks.generate_sample("niah_multikey_3", byte_tok, 40)
    for depth in [1.5, -0.1, math.nan, True, "0.5"]:
        with pytest.raises(ValueError, match="depth must be a number in"):
            tasks.generate_sample("niah_single_1", byte_tok, 200, depth=depth)
    with pytest.raises(ValueError, match="depth applies to niah_"):
        tasks.generate_sample("cwe", byte_tok, 200, depth=0.5)
    with pytest.raises(ValueError, match="qa_1 needs qa_file"):
        tasks.generate_sample("qa_1", byte_tok, 200)
    with pytest.raises(ValueError, match="haystack must be 'noise', 'essay' or a path"):
        tasks.generate_sample("niah_single_2", byte_tok, 200, haystack="/no/such/file.txt")
    with pytest.raises(ValueError, match="num_distractors"):
        tasks.generate_sample("niah_multikey_2", byte_tok, 200, num_distractors=2)
    with pytest.raises(ValueError, match="length must be a positive int"):
        tasks.generate_sample("niah_single_1", byte_tok, 0)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.generate_suite(["niah_single_1", "nope"], byte_tok, [100])


def test_bad_qa_file(byte_tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dict(question="Q?", answers=["a"])) + "\n")
    with pytest.raises(ValueError, match="exactly one of 'context'"):
        tasks.generate_sample("qa_1", byte_tok, 300, qa_file=str(path))


def test_128k_is_fast(byte_tok):
    for task in ["niah_single_2", "niah_multikey_2", "cwe"]:
        start = time.perf_counter()
        s = tasks.generate_sample(task, byte_tok, 131072, depth=0.5 if task != "cwe" else None, seed=0)
        assert len(s.input_ids) == 131072 and time.perf_counter() - start < 10


def test_synthetic_words_do_not_depend_on_earlier_requests():
    """cwe / fwe / the tokenizer corpus draw from one cached word sequence: asking for 300 words first must not
    change the 4096 that fwe uses (it did when the cache grew from a seed named by its current length)."""
    from hylo_lab.data.tasks.text import synthetic_words

    cache = []
    synthetic_words(300, cache)
    synthetic_words(1024, cache)
    assert synthetic_words(4096, cache) == synthetic_words(4096, [])
    assert len(set(synthetic_words(4096, []))) == 4096
