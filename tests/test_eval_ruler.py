import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hylo_lab import HyloForCausalLM
from hylo_lab.data import tasks as T
from hylo_lab.eval.niah import run_niah_grid
from hylo_lab.eval.ruler import run_ruler
from hylo_lab.plots import niah_heatmap, ruler_curve

from conftest import tiny_config

# 224 tokens holds every task's fixed parts with this tokenizer (the longest minimum, niah_multiquery with its
# RULER-style answer prefix restating the four keys, is 188 to 206 tokens over seeds 0-19)
LENGTH = 224


def tiny_tokenizer():
    """Byte-level BPE (512 tokens) trained on the task templates in a few ms: offline, no hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(T.tokenizer_corpus(200), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    records = [dict(question=f"Which town keeps the {c} bell?", answers=[f"Town{i}"],
                    context=f"The {c} bell hangs in Town{i}. It rings at noon.")
               for i, c in enumerate(["red", "blue", "green", "gold"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


class ScriptedLM(nn.Module):
    """A stand-in causal LM for the real decode path: after a prompt it emits `script[prompt]` token by token,
    then `eos`. Its "cache" is the position in each row's script; logits are one-hot."""

    def __init__(self, script: dict, vocab: int, eos: int):
        super().__init__()
        self.script, self.vocab, self.eos = script, vocab, eos
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=0):
        if past_key_values is None or past_key_values["todo"] is None:
            rows = input_ids if attention_mask is None else [r[m.bool()] for r, m in zip(input_ids, attention_mask)]
            past_key_values = dict(prompt=[r.tolist() for r in rows], todo=None)
            past_key_values["todo"] = [list(self.script.get(tuple(p), [])) + [self.eos]
                                       for p in past_key_values["prompt"]]
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        for i, todo in enumerate(past_key_values["todo"]):
            logits[i, 0, todo.pop(0) if todo else self.eos] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def oracle_model(tok, samples):
    script = {tuple(s.input_ids): tok(T.oracle_answer(s), add_special_tokens=False)["input_ids"] for s in samples}
    return ScriptedLM(script, len(tok), tok.eos_token_id)


def all_samples(tok, qa_file, num_samples=2):
    return T.generate_suite(None, tok, [LENGTH], num_samples=num_samples, qa_file=qa_file)


def test_oracle_scores_100_through_the_decode_path(tok, qa_file):
    model = oracle_model(tok, all_samples(tok, qa_file))
    res = run_ruler(model, tok, [LENGTH], num_samples=2, qa_file=qa_file, batch_size=3)
    assert (res["table"].status == "ok").all() and len(res["table"]) == 13
    assert (res["table"].score == 1.0).all()
    assert res["average"].average.tolist() == [1.0] and res["average"].complete.all()


def test_oracle_generate_fn_and_silent_model(tok):
    """Without a qa_file the QA tasks are reported as not run, not dropped; silence scores 0 everywhere."""
    oracle = run_ruler(None, tok, [LENGTH], num_samples=2, generate_fn=lambda ss: [T.oracle_answer(s) for s in ss])
    table = oracle["table"].set_index("task")
    assert (table.loc[list(T.QA_TASKS), "status"] == "not_run").all()
    assert "qa_file" in table.loc["qa_1", "reason"] and set(oracle["not_run"]) == set(T.QA_TASKS)
    assert (table[table.status == "ok"].score == 1.0).all()
    assert oracle["average"].iloc[0].tolist()[1:] == [1.0, 11, 13, False]

    silent = ScriptedLM({}, len(tok), tok.eos_token_id)  # emits eos at once: the empty prediction
    res = run_ruler(silent, tok, [LENGTH], num_samples=2, batch_size=4)
    assert all(r["prediction"] == "" for r in res["records"])
    assert (res["table"][res["table"].status == "ok"].score == 0.0).all()
    assert res["average"].average.tolist() == [0.0]


def test_too_short_lengths_are_reported(tok):
    res = run_ruler(None, tok, [96, LENGTH], tasks=["niah_single_1", "niah_multiquery"], num_samples=1,
                    generate_fn=lambda ss: [T.oracle_answer(s) for s in ss])
    t = res["table"].set_index(["task", "length"])
    assert t.loc[("niah_multiquery", 96), "status"] == "not_run"
    assert "too short" in t.loc[("niah_multiquery", 96), "reason"]
    assert t.loc[("niah_single_1", 96), "score"] == 1.0 and "niah_multiquery@96" in res["not_run"]


class FakeTracker:
    def __init__(self):
        self.metrics, self.figures, self.artifacts = {}, [], []

    def log_metrics(self, metrics, step=None):
        self.metrics.update(metrics)

    def log_figure(self, fig, name):
        self.figures.append(name)

    def log_artifact(self, path, artifact_path=None):
        self.artifacts.append((sorted(p.name for p in path.iterdir()), artifact_path))


def test_tiny_hylo_end_to_end_saves_and_logs(tok, tmp_path):
    torch.manual_seed(0)
    model = HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok))).eval()
    tracker = FakeTracker()
    res = run_ruler(model, tok, [LENGTH], tasks=["niah_single_1", "vt"], num_samples=2, batch_size=2,
                    prefill_chunk=64, tracker=tracker, out_dir=tmp_path / "ruler", label="student")
    assert set(tracker.metrics) == {f"eval/ruler/student/{LENGTH}/niah_single_1", f"eval/ruler/student/{LENGTH}/vt",
                                    f"eval/ruler/student/{LENGTH}/average"}
    assert tracker.figures == ["ruler_student"]
    files = {"samples.jsonl", "predictions.jsonl", "ruler_scores.csv", "ruler_average.csv", "summary.json"}
    assert tracker.artifacts == [(sorted(files), "ruler_student")]
    saved = T.load_samples(tmp_path / "ruler" / "samples.jsonl")
    assert [len(s.input_ids) for s in saved] == [LENGTH] * 4
    preds = [json.loads(line) for line in (tmp_path / "ruler" / "predictions.jsonl").read_text().splitlines()]
    assert [p["prediction"] for p in preds] == [r["prediction"] for r in res["records"]]
    assert all(0.0 <= r["score"] <= 1.0 for r in res["records"])


def test_niah_grid_oracle_and_heatmap(tok, tmp_path):
    depths = [0.0, 0.5, 1.0]
    oracle = lambda ss: [T.oracle_answer(s) for s in ss]  # noqa: E731
    tracker = FakeTracker()
    grid = run_niah_grid(None, tok, [40, 96, 128], depths, num_samples=2, generate_fn=oracle, tracker=tracker)
    ok = grid[grid.status == "ok"]
    assert len(grid) == 9 and (ok.score == 1.0).all() and set(ok.length) == {96, 128}
    assert "niah_single_1@40" in grid.attrs["not_run"]
    assert "eval/niah/128/0.5" in tracker.metrics and tracker.figures == ["niah"]
    fig = niah_heatmap(grid)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["40", "96", "128"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0%", "50%", "100%"]
    fig.savefig(tmp_path / "niah.png")
    assert (tmp_path / "niah.png").stat().st_size > 1000


def test_ruler_curve_compares_models():
    import pandas as pd

    table = pd.DataFrame([dict(model=m, task=t, length=n, score=s, status="ok")
                          for m, s in (("teacher", 0.9), ("student", 0.5)) for t in ("a", "b") for n in (64, 128)])
    fig = ruler_curve(table)
    assert {t.get_text() for t in fig.axes[0].get_legend().get_texts()} >= {"teacher", "student"}
