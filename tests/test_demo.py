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

from hylo_lab import tracking
from hylo_lab.demo import NIAH_TASKS, QUICK_PARAMETERS, DemoSettings, with_linear
from hylo_lab.demo.settings import EVAL_DEFAULTS
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
    """Same names as DemoSettings; the defaults are the quick run (what Run All in Lab should do), while
    DemoSettings and `hylo-lab demo` keep the full demo."""
    params = notebook_parameters(NOTEBOOK)
    fields = DemoSettings.__dataclass_fields__
    assert list(params) == list(fields)
    quick = {k: f.default for k, f in fields.items()} | QUICK_PARAMETERS
    assert {k: p.default for k, p in params.items()} == quick


@pytest.mark.parametrize("bad, message", [
    (dict(overrides="teacher=toy:llama-xxl"), "unknown toy teacher 'llama-xxl'"),
    (dict(overrides="student.layout=2MLA2RWKV"), "2MLA2RWKV"),
    (dict(overrides="student.layout=4MLA"), "at least one MLA and one linear layer"),
    (dict(overrides="student.mla_layers=[0, 1, 2]"), "2 MLA layers but 3 indices"),
    (dict(overrides="stages.kd-long.yarn.factor=0.5"), "factor=0.5"),
    (dict(overrides="stages.kd-lng.steps=3"), "has no entry 'kd-lng' (it has ild, kd-short, kd-long)"),
    (dict(overrides="train.bach_size=3"), "did you mean 'batch_size'"),
    (dict(overrides="train.batch_size"), "expected KEY=VALUE"),
    (dict(eval_lengths="256,abc"), "comma-separated integers"),
])
def test_bad_settings_fail_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match="demo settings are invalid") as err:
        DemoSettings(**bad)
    assert message in str(err.value)


def test_overrides_set_recipe_fields():
    assert DemoSettings(overrides="student.layout=2MLA2M2").mixers == ["mamba2", "mla", "mamba2", "mla"]
    placed = DemoSettings(overrides="student.layout=1MLA3GDN; student.mla_layers=[0]")
    assert placed.mixers == ["mla", "gdn", "gdn", "gdn"]
    assert with_linear("2MLA2GDN", "mamba2") == "2MLA2M2" and with_linear("1MLA3M2", "gdn") == "1MLA3GDN"
    s = DemoSettings(overrides="{stages.kd-long.steps: 300, stages.kd-short: null}")
    assert [(st["name"], st["steps"]) for st in s.recipe["stages"]] == [("ild", 150), ("kd-long", 300)]
    assert DemoSettings(quick=True).recipe["toy_world"]["quick"] is True and DemoSettings().yarn_factor == 64.0


def test_quick_demo_writes_every_artifact(quick_demo):
    out = quick_demo["out"]
    for name in ("00_quickstart.ipynb", "00_quickstart.html", "results.csv", "summary.json", "metrics.json",
                 "figures/niah_vs_length.png", "figures/cache_vs_length.png", "distill/summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "distill" / "summary.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())  # what an untracked sweep exports
    assert {"eval/hybrid/niah/256", "eval/teacher/niah/512", "eval/teacher_yarn/ppl/256"} <= set(metrics)
    html = (out / "00_quickstart.html").read_text()
    assert "data:image/png;base64" in html  # figures inline
    assert "NIAH teacher" in quick_demo["stdout"] and "goals:" in quick_demo["stdout"]
    assert "[demo" in quick_demo["stdout"] + quick_demo["stderr"]  # progress streamed from the kernel
    assert "elapsed, about" in quick_demo["stdout"] + quick_demo["stderr"]  # the overall progress line
    assert "MLflow run: http" in quick_demo["stdout"]


def test_quick_demo_report_reads_as_a_report(quick_demo):
    """The executed notebook opens with the question, headline, goals and conclusion, then the figures; it holds
    (almost) no stderr output, no progress-bar spam, and summary.json holds no absolute path."""
    import nbformat

    out = quick_demo["out"]
    nb = nbformat.read(str(out / "00_quickstart.ipynb"), as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    stderr = [o for o in outputs if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert len(stderr) <= 2, [o["text"][:200] for o in stderr]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert text.count("\n") < 200, f"{text.count(chr(10))} lines of stream output"
    assert "FutureWarning" not in text and "Loading weights" not in text
    lead = nb.cells[1]
    assert "report" in lead.metadata.get("tags", [])
    shown = lead.outputs[0]["data"]["text/markdown"]
    assert "**Question.**" in shown and "**Headline.**" in shown and "| goal | met |" in shown
    assert "**Conclusion.**" in shown and "hybrid 2MLA2GDN" in shown
    assert all("image/png" in c.outputs[0]["data"] for c in nb.cells[2:4])
    assert nb.cells[4].source.startswith("## Details")
    summary = (out / "summary.json").read_text()
    assert str(out.parent) not in summary and str(Path.home()) not in summary
    html = (out / "00_quickstart.html").stat().st_size
    assert html < 1_500_000, f"the HTML report is {html} bytes"


def test_quick_demo_logs_every_metric(quick_demo):
    import mlflow

    s = quick_demo["summary"]
    client = mlflow.MlflowClient(quick_demo["uri"])
    run = client.get_run(s["run_id"])
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    lengths = [int(x) for x in EVAL_DEFAULTS[True]["eval_lengths"].split(",")]
    models = ("teacher", "teacher_yarn", "hybrid")
    expected = [f"eval/{m}/ppl/256" for m in models] + ["train/teacher/llama-s/loss"]
    for n in lengths:
        expected += [f"eval/{m}/niah/{n}" for m in models] + [f"eval/{m}/cache_bytes/{n}" for m in models]
        expected += [f"eval/{m}/niah/{n}/{t}" for m in models for t in NIAH_TASKS]
    missing = [m for m in expected if m not in metrics]
    assert not missing, f"not logged: {missing}"
    assert not [k for k in metrics if k.startswith(("demo/", "teacher/", "eval/niah/", "eval/ruler/"))]
    assert any(k.startswith("train/ild") for k in metrics) and any(k.startswith("train/kd-") for k in metrics)
    assert len(client.get_metric_history(s["run_id"], "train/teacher/llama-s/loss")) > 1  # a curve, not a point
    assert metrics["eval/hybrid/cache_bytes/512"] < metrics["eval/teacher/cache_bytes/512"]
    tags = run.data.tags
    for key in ("summary.ppl_ratio", "summary.cache_ratio_longest", "summary.goals.ppl_within_10pct"):
        assert key in tags, key
    assert run.info.run_name.startswith("demo-quick 2MLA2GDN seed0 20")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert s["run_url"].endswith(f"/#/experiments/{run.info.experiment_id}/runs/{s['run_id']}{tracking.UI_QUERY}")
    assert {"tables/summary.json", "tables/results.csv"} <= {a.path for a in client.list_artifacts(s["run_id"], "tables")}
    artifacts = {a.path for a in client.list_artifacts(s["run_id"], "figures")}
    assert {"figures/niah_vs_length.png", "figures/cache_vs_length.png"} <= artifacts
    notebook = {a.path for a in client.list_artifacts(s["run_id"], "notebook")}
    assert {"notebook/00_quickstart.ipynb", "notebook/00_quickstart.html"} <= notebook
    params = run.data.params
    assert params["quick"] == "True" and params["student_layout"] == "2MLA2GDN"


def results_fixture():
    """A results table like evaluate_models returns, for three models at 1x .. 32x."""
    import pandas as pd

    from hylo_lab.stats import accuracy_ci

    rows = []
    for model, acc, cache in (("teacher", [1.0, 0.9, 0.3, 0.1, 0.0, 0.0], 4.0), ("teacher_yarn", [1.0, 0.8, 0.5, 0.2,
                              0.1, 0.0], 4.0), ("hybrid", [1.0, 1.0, 0.9, 0.9, 0.8, 0.8], 1.0)):
        for i, length in enumerate((256, 512, 1024, 2048, 4096, 8192)):
            ci = accuracy_ci(round(acc[i] * 64), 64)
            rows.append(dict(model=model, length=length, niah=acc[i], niah_low=ci["low"], niah_high=ci["high"], n=64,
                             ppl=3.0, cache_bytes=cache * length * 1024,
                             cache_bytes_measured=cache * length * 1024 if length <= 2048 else None))
    return pd.DataFrame(rows)


def test_demo_figures_follow_the_house_style(tmp_path):
    """Both figures of the report render from a fixture: multiples of the training length on x, the hybrid named
    with its layout, model colours from plots.model_color, the Wilson bands' n, the cache ratio labelled."""
    import hylo_lab.demo as demo
    from hylo_lab.plots import model_color

    assert not hasattr(demo, "niah_figure") and not hasattr(demo, "cache_figure")
    settings = DemoSettings(out_dir=str(tmp_path))
    (tmp_path / "figures").mkdir()
    figs = demo.figures(settings, results_fixture())
    ax = figs["niah_vs_length"].axes[0]
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["1x", "2x", "4x", "8x", "16x", "32x"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "hybrid 2MLA2GDN" in labels and "teacher llama-s + YaRN x64" in labels
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    assert colors["hybrid 2MLA2GDN"] == model_color("hybrid") and colors["teacher llama-s"] == model_color("teacher")
    assert any("n = 64" in t.get_text() for t in ax.texts)
    cache_ax = figs["cache_vs_length"].axes[0]
    assert any("0.25x" in t.get_text() for t in cache_ax.texts)
    assert {p.name for p in (tmp_path / "figures").iterdir()} == {"niah_vs_length.png", "cache_vs_length.png"}


def test_conclusion_and_report_are_written_from_the_numbers():
    import hylo_lab.demo as demo

    summary = dict(quick=False, teacher_niah_1x=1.0, hybrid_niah_longest=0.83, longest=8192, longest_multiple=32.0,
                   teacher_niah_beyond_4x_max=0.05, teacher_yarn_niah_beyond_4x_max=0.11, ppl_ratio=1.04,
                   cache_ratio_longest=0.27, seconds=600.0, run_url="http://127.0.0.1:5000/#/experiments/1/runs/x",
                   goals=dict(teacher_niah_1x_ge_95=True, hybrid_niah_32x_ge_80=True,
                              teachers_below_20_beyond_4x=True, ppl_within_10pct=True))
    text = demo.conclusion(summary, "2MLA2GDN")
    assert "NIAH 0.83 at 8192 tokens (32x" in text and "0.27x the teacher's cache" in text
    assert "at most 0.05 (0.11 with YaRN)" in text and "4 of 4 goals met." in text
    shown = demo.report(summary, DemoSettings()).data
    assert shown.index("**Question.**") < shown.index("**Headline.**") < shown.index("| goal |") \
        < shown.index("**Conclusion.**")
    assert "http://127.0.0.1:5000/#/experiments/1/runs/x" in shown
    summary["goals"]["ppl_within_10pct"] = False
    assert "3 of 4 goals met" in demo.conclusion(summary)


def test_progress_bars_print_a_few_lines_off_a_terminal(capsys, monkeypatch):
    from hylo_lab.progress import Overall, bar

    monkeypatch.setenv("HYLO_LAB_PROGRESS", "lines")
    for _ in bar(range(1000), desc="teacher llama-s"):
        pass
    lines = capsys.readouterr().out.strip().splitlines()
    assert 2 <= len(lines) <= 5 and lines[-1].startswith("teacher llama-s: 1000/1000 done in")
    seen = []
    overall = Overall("demo", dict(a=10.0, b=30.0), echo=seen.append)
    overall.step("a")
    assert seen[0].startswith("[demo 1/2 a | 0:00 elapsed, about 0:40 left]")
    overall.t0 -= 20.0  # step a took twice its typical time: b is expected to as well
    overall.step("b")
    assert "about 1:00 left" in seen[1] and seen[1].startswith("[demo 2/2 b | 0:20 elapsed")
    assert overall.done().startswith("[demo done in 0:20")
