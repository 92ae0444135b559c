import json
import math

import pytest
import torch

from hylo_lab import HyloForCausalLM
from hylo_lab.eval.generation import greedy_generate
from hylo_lab.eval.harness import PAPER_HARNESS_TASKS, MissingTaskData, run_harness

from conftest import tiny_config

pytest.importorskip("lm_eval")

QUESTIONS = [("Is the sky blue?", ["yes", "no"], 0), ("Is fire cold?", ["yes", "no"], 1),
             ("Which is a colour?", ["red", "table", "seven"], 0)]
TEXTS = ["The grass is green and the sky is blue.", "Here we go, there and back again."]


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([q for q, _, _ in QUESTIONS] + TEXTS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   clean_up_tokenization_spaces=False)


TASKS = {
    "tiny_mc": ("mc.jsonl", [dict(question=q, choices=c, label=y) for q, c, y in QUESTIONS], """
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""),
    "tiny_gen": ("gen.jsonl", [dict(question=q, answer=c[y]) for q, c, y in QUESTIONS], """
output_type: generate_until
doc_to_text: "Q: {{question}} A:"
doc_to_target: " {{answer}}"
generation_kwargs:
  until: ["?"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""),
    "tiny_rolling": ("text.jsonl", [dict(text=t) for t in TEXTS], """
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
"""),
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    for name, (data, rows, body) in TASKS.items():
        (d / data).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                        f"    test: {d / data}\ntest_split: test\n{body}")
    return d


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok), max_position_embeddings=128)).eval()
    return model, tok


def loglik(model, context_ids, cont_ids):
    ids = torch.tensor([context_ids + cont_ids])
    logp = model(ids, use_cache=False).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(context_ids) - 1 + i, t].item() for i, t in enumerate(cont_ids))


def test_local_tasks_on_a_tiny_hylo(setup, task_dir, tmp_path):
    model, tok = setup
    res = run_harness(model, tok, list(TASKS), include_path=task_dir, log_samples=True, batch_size=2,
                      bootstrap_iters=0, out_dir=tmp_path)
    assert set(res["results"]) == set(TASKS)
    # multiple choice: lm-eval's per-choice log-likelihoods are the model's own
    for s in res["samples"]["tiny_mc"]:
        q, choices, _ = QUESTIONS[s["doc_id"]]
        ctx = tok(q, add_special_tokens=False)["input_ids"]
        for (ll, _), choice in zip(s["filtered_resps"], choices):
            whole = tok(q + " " + choice, add_special_tokens=False)["input_ids"]
            assert ll == pytest.approx(loglik(model, ctx, whole[len(ctx):]), abs=1e-4)
    acc = res["results"]["tiny_mc"]["acc"]
    assert acc == pytest.approx(sum(s["acc"] for s in res["samples"]["tiny_mc"]) / 3)
    assert res["primary"]["tiny_mc"] == ("acc", acc)
    # generation goes through greedy_generate and is cut at the stop string
    for s in res["samples"]["tiny_gen"]:
        ids = tok(f"Q: {QUESTIONS[s['doc_id']][0]} A:", add_special_tokens=False)["input_ids"]
        text = tok.decode(greedy_generate(model, [ids], 6, eos_token_id=tok.eos_token_id)[0],
                          skip_special_tokens=True)
        assert s["resps"][0][0] == text.split("?")[0]
    # rolling log-likelihood: the whole text after lm-eval's prefix token (eos here)
    doc = res["samples"]["tiny_rolling"][0]
    ids = tok(TEXTS[doc["doc_id"]], add_special_tokens=False)["input_ids"]
    assert doc["resps"][0][0] == pytest.approx(loglik(model, [tok.eos_token_id], ids), abs=1e-4)
    assert math.isfinite(res["results"]["tiny_rolling"]["word_perplexity"])
    assert (tmp_path / "harness_results.json").exists()


def test_missing_data_is_a_clear_error(task_dir, setup, tmp_path):
    """A task over a hub data set (here the paper's ARC path) cannot load offline: fail before any model call."""
    (tmp_path / "arc_like.yaml").write_text("task: arc_like\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n"
                                            "test_split: test\n" + TASKS["tiny_mc"][2])
    with pytest.raises(MissingTaskData, match=r"(?s)arc_like: data set not available offline.*include_path"):
        run_harness(*setup, ["arc_like"], include_path=tmp_path)
    with pytest.raises(MissingTaskData, match="no_such_task: unknown task"):
        run_harness(*setup, ["no_such_task", "tiny_mc"], include_path=task_dir, include_defaults=False)


def test_paper_task_list():
    assert PAPER_HARNESS_TASKS == ("arc_challenge", "arc_easy", "hellaswag", "openbookqa", "piqa", "race",
                                   "winogrande", "gsm8k")
