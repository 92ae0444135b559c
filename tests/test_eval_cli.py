import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hylo_lab import HyloForCausalLM
from hylo_lab.cli import main
from hylo_lab.data import tasks as T
from hylo_lab.eval import evaluate

from conftest import tiny_config
from test_eval_ruler import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_evaluate_a_plain_transformers_model(tok):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                         max_position_embeddings=512))
    res = evaluate(llama, ["ruler", "efficiency"], tokenizer=tok, lengths=[160], tasks=["niah_single_1"],
                   num_samples=2, batch_size=2, prefill_chunk=64, decode_tokens=2)
    assert res["ruler"]["table"].status.tolist() == ["ok"]
    # K and V x 2 layers x 2 KV heads x 8 dims x 4 bytes x 160 tokens x batch 2
    assert res["efficiency"][0]["cache_bytes_measured"] == 2 * 2 * 2 * 8 * 4 * 160 * 2
    with pytest.raises(ValueError, match="unknown suite"):
        evaluate(llama, "rulers", tokenizer=tok)


def test_cli_eval_saved_hylo_logs_to_mlflow(tok, tmp_path, monkeypatch, capsys):
    """`hylo-lab eval DIR` on a saved tiny hybrid: four suites, one MLflow run, samples and figures as artifacts."""
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok))).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(dict(text=" ".join(T.tokenizer_corpus(12)[5:]))) + "\n" for _ in range(2)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(["eval", str(model_dir), "--suite", "ruler,niah,ppl,efficiency", "--lengths", "160",
          "--tasks", "niah_single_1,qa_1", "--depths", "0,1", "--num-samples", "1", "--documents", str(docs),
          "--prefill-chunk", "64", "--decode-tokens", "2", "--label", "student", "--tracking-uri", uri,
          "--experiment", "eval_test", "--out-dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "== ruler ==" in printed and "qa_1: no qa_file" in printed and "== efficiency ==" in printed

    import mlflow

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("eval_test").experiment_id])
    metrics = set(run.data.metrics)
    assert {"eval/ruler/student/160/niah_single_1", "eval/ruler/student/160/average", "eval/niah/student/160/0",
            "eval/niah/student/160/1", "eval/ppl/student/160", "eval/efficiency/student/160/ttft_s"} <= metrics
    assert not any("qa_1" in m for m in metrics)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"figures", "ruler_student", "niah_student", "ppl_student", "tables"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "figures")} >= {
        "figures/ruler_student.png", "figures/niah_student.png", "figures/ppl_student.png",
        "figures/efficiency_student.png"}
    assert (tmp_path / "out" / "ruler_student" / "samples.jsonl").exists()
    assert (tmp_path / "out" / "efficiency_student" / "efficiency.csv").exists()
