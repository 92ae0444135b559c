"""`hylo-lab eval`'s overall progress line: one line per suite on stderr, its estimate from the finished parts."""
import re

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hylo_lab import progress
from hylo_lab.eval import evaluate, part_costs

from test_eval_ruler import tiny_tokenizer


def test_part_costs_count_the_tokens_each_suite_reads():
    costs = part_costs(["niah", "ruler", "ppl", "efficiency"], [128, 256], tasks=["niah_single_1", "qa_1"],
                       depths=[0, 0.5, 1], num_samples=2, documents=["a", "b", "c"], batch_size=2, decode_tokens=4)
    assert costs == {"niah 128..256": 3 * 2 * 384, "ruler 128..256": 2 * 2 * 384, "ppl 128..256": 3 * 256,
                     "efficiency 128..256": 2 * (132 + 260)}
    assert list(part_costs(["harness", "niah"], [64], limit=10)) == ["harness", "niah 64"]


def test_relative_estimate_scales_the_remaining_cost_by_the_measured_speed(monkeypatch):
    clock = iter([0.0, 0.0, 10.0, 10.0, 40.0])  # t0, first line; second step after 10 s; done after 40 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    seen = []
    overall = progress.Overall("eval", {"niah 64": 100.0, "ppl 64": 300.0}, relative=True, echo=seen.append)
    overall.step("niah 64")
    overall.step("ppl 64")
    overall.done()
    assert seen == ["[eval 1/2 niah 64 | 0:00 elapsed, estimate after the first step]",
                    "[eval 2/2 ppl 64 | 0:10 elapsed, about 0:30 left]", "[eval done in 0:40]"]


def test_evaluate_prints_the_overall_line_per_suite_on_stderr(capsys):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=512))
    evaluate(llama, ["niah", "efficiency"], tokenizer=tok, lengths=[160], depths=[0, 1], num_samples=1,
             prefill_chunk=64, decode_tokens=2, progress=True)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("[eval")]
    assert lines[0] == "[eval 1/2 niah 160 | 0:00 elapsed, estimate after the first step]", err
    assert re.fullmatch(r"\[eval 2/2 efficiency 160 \| \d+:\d\d elapsed, about \d+:\d\d left\]", lines[1]), lines
    assert re.fullmatch(r"\[eval done in \d+:\d\d\]", lines[2]) and len(lines) == 3 and "[eval" not in out
    evaluate(llama, ["efficiency"], tokenizer=tok, lengths=[64], decode_tokens=1)
    assert "[eval" not in capsys.readouterr().err  # off unless asked (notebooks, the library)
