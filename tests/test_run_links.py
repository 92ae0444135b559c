"""Every command that logs to MLflow ends with one line, `MLflow run: <address>`, that opens its run on the runs
table (tracking.UI_QUERY): `hylo-lab eval`, `hylo-lab sweep` (the parent run) and `hylo-lab distill` (issue 17
item 3), on the tiny fixtures of their own tests. Also: two processes creating one new sqlite store at once both
log (tracking.store_creation)."""
import subprocess
import sys

import torch
import yaml

from hylo_lab.cli import main

from conftest import tiny_config
from test_distill_trainer import recipe, world  # noqa: F401 (a fixture)
from test_eval_ruler import tiny_tokenizer
from test_sweep import TINY_NB


def run_link(uri: str, experiment: str, run_name: str | None = None) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if run_name in (None, r.info.run_name)]
    assert len(runs) == 1
    return (f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}"
            "?workflowType=machine_learning")


def test_eval_ends_with_its_run_link(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the working directory
    from hylo_lab import HyloForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    HyloForCausalLM(tiny_config(("mla", "gdn"), vocab_size=len(tok))).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(["eval", str(tmp_path / "model"), "--suite", "efficiency", "--lengths", "64", "--prefill-chunk", "32",
          "--decode-tokens", "2", "--tracking-uri", uri, "--experiment", "eval_link"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"MLflow run: {run_link(uri, 'eval_link')}"
    main(["eval", str(tmp_path / "model"), "--suite", "efficiency", "--lengths", "64", "--prefill-chunk", "32",
          "--decode-tokens", "2", "--no-track"])
    assert "MLflow run" not in capsys.readouterr().out


def test_sweep_ends_with_its_parent_runs_link(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(dict(name="linked", notebook=str(TINY_NB), experiment="sweep_link",
                                        fixed={"scale": 0.5}, grid={"x": [1]}, metrics=["score"])))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    main(["sweep", str(path), "--tracking-uri", uri, "--out-dir", str(tmp_path / "out")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"MLflow run (the sweep's parent): {run_link(uri, 'sweep_link', 'linked')}"


def test_distill_ends_with_its_run_link(world, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw = recipe(world, tmp_path / "out", ild_steps=1, kd_steps=1)
    raw["tracking"] = dict(enabled=True, tracking_uri=uri, experiment="distill_link")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    main(["distill", str(path), "--max-steps", "1"])
    lines = capsys.readouterr().out.strip().splitlines()
    link = f"MLflow run: {run_link(uri, 'distill_link')}"
    assert lines[-2].startswith("stopped after --max-steps 1") and lines[-1] == link
    main(["distill", str(path), "--resume"])  # the same run, continued
    assert capsys.readouterr().out.strip().splitlines()[-2:] == [f"final model: {tmp_path / 'out' / 'kd' / 'final'}",
                                                                link]
    main(["distill", str(path), "--output-dir", str(tmp_path / "untracked"), "--no-mlflow"])
    assert "MLflow run" not in capsys.readouterr().out


CREATE = """
import os, sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # imported before the barrier, so the migrations start together
from hylo_lab.tracking import Tracker
barrier = Path(sys.argv[2])
(barrier / str(os.getpid())).touch()
while len(list(barrier.iterdir())) < int(sys.argv[3]):
    time.sleep(0.01)
print(Tracker("race", tracking_uri=sys.argv[1]).active)
"""


def test_processes_creating_one_new_store_at_once_all_log(tmp_path):
    """Without the lock all but one fail MLflow's migration ("duplicate column name", "table
    _alembic_tmp_experiments already exists") and log nothing: 02_distill's missing run in test_notebooks, whose
    notebook starts beside a sweep on a new store."""
    uri, barrier = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "barrier"
    barrier.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", CREATE, uri, str(barrier), "3"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [o.strip() for o, _ in outs] == ["True"] * 3, "\n".join(e[-800:] for _, e in outs)
