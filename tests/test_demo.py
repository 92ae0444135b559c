"""`hylo-lab demo --quick`: the whole toy recipe through papermill, once per module (about a minute on 2 cores).

Checks what CI must see: the executed notebook, its HTML, the figures and tables on disk, and every metric the
demo promises in its MLflow run. Values are not checked (quick models are untrained); only that they exist.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hylo_lab.demo import NIAH_TASKS, QUICK_PARAMETERS, DemoSettings
from hylo_lab.sweep import notebook_parameters

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "00_quickstart.ipynb"


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # one thread: under `pytest -n 2` on two cores, two-thread BLAS in each worker slows everything down manyfold
    env = dict(os.environ, HYLO_LAB_HOME=str(tmp / "home"), MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "hylo_lab.cli", "demo", "--quick", "--out", str(out)], env=env,
                          cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return dict(out=out, uri=uri, stdout=proc.stdout, stderr=proc.stderr,
                summary=json.loads((out / "summary.json").read_text()))


def test_the_notebook_declares_exactly_the_demo_settings():
    params = notebook_parameters(NOTEBOOK)
    fields = DemoSettings.__dataclass_fields__
    assert list(params) == list(fields)
    assert {k: p.default for k, p in params.items()} == {k: f.default for k, f in fields.items()}


@pytest.mark.parametrize("bad, message", [
    (dict(teacher="llama-xxl"), "teacher='llama-xxl'"),
    (dict(linear="rwkv"), "linear='rwkv'"),
    (dict(layout="4MLA"), "at least one MLA and one linear layer"),
    (dict(layout="2MLA2GDN", mla_layers="0,1,2"), "2 MLA layers but 3 indices"),
    (dict(eval_lengths="256,abc"), "comma-separated integers"),
    (dict(yarn_factor=0.5), "yarn_factor=0.5"),
])
def test_bad_settings_fail_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match="demo settings are invalid") as err:
        DemoSettings(**bad)
    assert message in str(err.value)


def test_linear_replaces_the_layouts_linear_block():
    assert DemoSettings(layout="2MLA2GDN", linear="mamba2").mixers == ["mamba2", "mla", "mamba2", "mla"]
    assert DemoSettings(layout="1MLA3GDN", mla_layers="0").mixers == ["mla", "gdn", "gdn", "gdn"]


def test_quick_demo_writes_every_artifact(quick_demo):
    out = quick_demo["out"]
    for name in ("00_quickstart.ipynb", "00_quickstart.html", "results.csv", "summary.json",
                 "figures/niah_vs_length.png", "figures/cache_vs_length.png", "distill/summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "distill" / "summary.json").is_file()
    html = (out / "00_quickstart.html").read_text()
    assert "data:image/png;base64" in html  # figures inline
    assert "NIAH teacher" in quick_demo["stdout"] and "goals:" in quick_demo["stdout"]
    assert "[demo" in quick_demo["stderr"]  # progress streamed from the kernel


def test_quick_demo_logs_every_metric(quick_demo):
    import mlflow

    s = quick_demo["summary"]
    client = mlflow.MlflowClient(quick_demo["uri"])
    run = client.get_run(s["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    lengths = [int(x) for x in QUICK_PARAMETERS["eval_lengths"].split(",")]
    expected = ["teacher/llama-s/niah/256", "teacher/llama-s/heldout_ppl", "eval/ppl/256", "eval/ppl/teacher/256",
                "eval/ppl/teacher_yarn/256", "demo/teacher_niah_1x", "demo/hybrid_niah_longest", "demo/ppl_ratio",
                "demo/cache_ratio_longest", "demo/goal/ppl_within_10pct"]
    for n in lengths:
        expected += [f"eval/niah/{n}", f"eval/niah/teacher/{n}", f"eval/niah/teacher_yarn/{n}",
                     f"eval/cache_bytes/teacher/{n}", f"eval/cache_bytes/hybrid/{n}"]
        expected += [f"eval/ruler/hybrid/{n}/{t}" for t in NIAH_TASKS]
    missing = [m for m in expected if m not in metrics]
    assert not missing, f"not logged: {missing}"
    assert any(k.startswith("train/ild") for k in metrics) and any(k.startswith("train/kd-") for k in metrics)
    assert metrics["eval/cache_bytes/hybrid/512"] < metrics["eval/cache_bytes/teacher/512"]
    artifacts = {a.path for a in client.list_artifacts(s["run_id"], "figures")}
    assert {"figures/niah_vs_length.png", "figures/cache_vs_length.png"} <= artifacts
    notebook = {a.path for a in client.list_artifacts(s["run_id"], "notebook")}
    assert {"notebook/00_quickstart.ipynb", "notebook/00_quickstart.html"} <= notebook
    params = run.data.params
    assert params["quick"] == "True" and params["student_layout"] == "2MLA2GDN"
