"""The notebook helpers on small inputs (the notebooks themselves run in tests/test_notebooks.py): parameter
strings, model references, the SVD spectra and per-layer KL of a conversion, live loss curves, sweeps."""
from pathlib import Path

import pandas as pd
import pytest
import torch

from hylo_lab import nbtools, plots


def tiny_llama(tmp_path, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def test_parameter_strings_become_library_arguments():
    assert nbtools.split("256, 512,", int) == [256, 512] and nbtools.split("") == []
    assert nbtools.upcycle_options(mla_layers="0,2", linear="mamba2") == dict(
        linear="mamba2", rope_init="filled", seed=0, mla_layers=[0, 2])
    kw = nbtools.upcycle_options(layout="2MLA2GDN", q_lora_rank=0, kv_lora_rank=16, rank_energy=0.9)
    assert kw["select"] == "uniform" and kw["q_lora_rank"] == 0 and kw["kv_lora_rank"] == 16
    assert kw["rank_energy"] == 0.9
    assert nbtools._plain(dict(haystack="", prefill_chunk=0, seed=3)) == dict(haystack=None, prefill_chunk=None, seed=3)


def test_model_references_and_labels(tmp_path):
    assert nbtools.model_label("toy:llama-s") == "llama-s"
    assert nbtools.model_label("runs/x/kd-512/final") == "kd-512"
    assert nbtools.model_label("meta-llama/Llama-3.2-1B") == "Llama-3.2-1B"
    assert nbtools.model_path("some-org/some-model") == "some-org/some-model"  # a hub id passes through
    assert nbtools.model_path(str(tmp_path)) == str(tmp_path)
    assert nbtools.project_path("pyproject.toml").is_file()  # from any directory: the checkout's root


def test_tracking_uri_defaults_to_the_project_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert nbtools.resolve_tracking_uri("") == f"sqlite:///{nbtools.project_root() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////x.db")
    assert nbtools.resolve_tracking_uri("") == "sqlite:////x.db"
    assert nbtools.resolve_tracking_uri("file:///y") == "file:///y"


def test_one_default_store_the_checkouts_root_from_any_of_its_folders(tmp_path, monkeypatch):
    """Notebooks (kernel in notebooks/), the CLI and the library share one default: the checkout's mlflow.db from
    any folder inside it; outside a checkout, the working directory's."""
    from hylo_lab.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    checkout, elsewhere = tmp_path / "checkout", tmp_path / "elsewhere"
    (checkout / "notebooks").mkdir(parents=True)
    elsewhere.mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "hylo_lab"\n')
    for folder in (checkout, checkout / "notebooks"):
        monkeypatch.chdir(folder)
        assert default_tracking_uri() == nbtools.resolve_tracking_uri("") == f"sqlite:///{checkout / 'mlflow.db'}"
    monkeypatch.chdir(elsewhere)
    assert nbtools.resolve_tracking_uri("") == f"sqlite:///{elsewhere / 'mlflow.db'}"


def test_spectra_kept_energy_and_layer_kl_of_a_conversion(tmp_path):
    from hylo_lab.upcycle import upcycle

    base = tiny_llama(tmp_path)
    options = nbtools.upcycle_options(mla_layers="1", kv_lora_rank=8)
    student = upcycle(base, **options)
    spectra = nbtools.svd_spectra(base, student.config)
    assert set(spectra.matrix) == {"q", "kv"} and set(spectra.layer) == {0, 1}
    assert spectra.groupby(["layer", "matrix"]).energy.max().tolist() == pytest.approx([1.0] * 4)
    kept = nbtools.kept_energy(spectra)
    assert kept[kept.mla].layer.unique().tolist() == [1]
    # the kept energy is what upcycle recorded for the MLA layer
    recorded = student.config.upcycle["kept_energy"]["kv_energy"][0]
    assert kept[(kept.layer == 1) & (kept.matrix == "kv")].kept.item() == pytest.approx(recorded, abs=1e-5)

    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    per_layer = nbtools.layer_kl(base, ids, kinds=("mla", "gdn"), **options)
    assert per_layer[["layer", "kind"]].values.tolist() == [[0, "mla"], [1, "mla"], [0, "gdn"], [1, "gdn"]]
    assert (per_layer.kl >= 0).all()
    hybrid = nbtools.init_kl(student, base, ids)
    metrics = nbtools.upcycle_metrics(student, spectra, per_layer, hybrid)
    assert metrics["init/kl/hybrid"] == hybrid and "init/kl/gdn/1" in metrics
    assert set(k for k in metrics if "kept_energy" in k) == {"upcycle/kept_energy/q/1", "upcycle/kept_energy/kv/1"}
    for fig in (plots.svd_spectra_figure(spectra), plots.layer_kl_figure(per_layer, mla_layers=[1], hybrid_kl=hybrid)):
        fig.savefig(tmp_path / "f.png")


def test_live_loss_keeps_losses_and_kl_and_forwards_to_the_tracker():
    class Recorder:
        active = True

        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((metrics, step))

        def set_tags(self, tags):
            self.calls.append(tags)

    inner = Recorder()
    live = nbtools.LiveLoss(inner, show=False)
    live.log_metrics({"eval/ild/mla/kl": 0.5, "eval/ild/mla/ild": 2.0}, step=0)
    live.log_metrics({"train/ild/mla/loss": 3.0, "train/ild/mla/lr": 1e-3}, step=1)
    live.log_metrics({"train/kd/loss": 1.0, "train/kd/kl": 1.0}, step=1)
    live.set_tags({"final_model": "x"})
    assert [c[1] for c in inner.calls[:3]] == [0, 1, 1] and inner.calls[3] == {"final_model": "x"}
    h = live.history()
    assert h.values.tolist() == [["ild/mla", "eval", 0, 0.5], ["ild/mla", "train", 1, 3.0], ["kd", "train", 1, 1.0]]
    live.figure()
    assert nbtools.LiveLoss(None, show=False).log_artifact("anything") is None  # no tracker: nothing logged


def test_distill_recipe_from_parameters(tmp_path):
    spec = nbtools.distill_recipe(out_dir=str(tmp_path / "run"), teacher="", ild_steps=0, kd_steps=5, seq_len=64)
    assert [s.kind for s in spec.stages] == ["kd"] and spec.stages[0].steps == 5 and spec.teacher is None
    assert spec.output_dir == str(tmp_path / "run") and not spec.tracking.enabled and spec.toy_world.quick
    assert spec.student.mla_layers == [1] and spec.student.linear == "gdn"
    toy = nbtools.distill_recipe("recipes/toy.yaml", out_dir=str(tmp_path / "toy"))
    assert toy.name == "toy-1mla3gdn" and toy.output_dir == str(tmp_path / "toy")
    summary = {"runs": {"ild/mla": {"steps": 3, "eval_kl": [[0, 0.4], [3, 0.2]]}, "kd": {"steps": 2, "eval_kl": []}}}
    assert nbtools.distill_metrics(summary) == {"distill/ild/mla/steps": 3, "distill/ild/mla/eval_kl": 0.2,
                                                "distill/kd/steps": 2}


def test_result_dicts_of_the_evaluation_notebooks():
    tables = dict(ruler_average=pd.DataFrame(dict(model=["a", "a", "b"], length=[128, 256, 128],
                                                  average=[1.0, 0.5, 0.0])),
                  niah=pd.DataFrame(dict(model=["a", "b", "b"], length=[128] * 3, depth=[0, 0, 1],
                                         score=[1.0, 0.5, float("nan")], status=["ok", "ok", "not_run"])))
    assert nbtools.long_context_metrics(tables) == {"summary/ruler/a": 0.75, "summary/ruler/b": 0.0,
                                                    "summary/niah/a": 1.0, "summary/niah/b": 0.5}
    rows = pd.DataFrame(dict(model=["a", "a", "a"], length=[64, 128, 256], status=["ok", "ok", "oom"],
                             ttft_s=[0.1, 0.2, None], tpot_s=[0.01, 0.02, None],
                             cache_bytes_measured=[2**20, 2**21, None]))
    assert nbtools.efficiency_metrics(rows) == {"summary/a/length": 128, "summary/a/ttft_s": 0.2,
                                                "summary/a/tpot_s": 0.02, "summary/a/cache_mib": 2.0}


def test_sweeps_listed_picked_and_summarised(tmp_path):
    empty = nbtools.list_sweeps(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert empty.empty and list(empty.columns)[:2] == ["name", "experiment"]
    with pytest.raises(LookupError, match="no sweep in this MLflow store"):
        nbtools.pick_sweep("", empty)
    assert nbtools.pick_sweep("", pd.DataFrame(dict(name=["newest", "older"]))) == "newest"
    assert nbtools.pick_sweep("layer_ratio", empty) == "layer_ratio"
    assert Path(nbtools.pick_sweep("ablations/yarn.yaml", empty)).is_file()
    assert nbtools.results_dir("", "ablations/yarn.yaml") == nbtools.project_root() / "ablations" / "results" / "yarn"
    assert nbtools.results_dir(str(tmp_path), "yarn") == tmp_path
    frame = pd.DataFrame(dict(point=["x=1", "x=2"], x=[1, 2], status=["FINISHED", "FAILED"], duration_s=[2.0, 1.0],
                              run_id=["a", "b"], score=[0.5, float("nan")]))
    assert nbtools.compare_metrics(frame) == {"compare/points": 2, "compare/finished": 1, "compare/failed": 1,
                                              "compare/duration_s": 3.0}
    plots.sweep_overview(frame).savefig(tmp_path / "overview.png")
    plots.loss_curves(pd.DataFrame(columns=["run", "split", "step", "value"])).savefig(tmp_path / "empty.png")
