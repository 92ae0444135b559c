"""The notebooks: each has one `parameters` cell that sweeps and papermill can read, and each runs top to bottom
under papermill with tiny parameters on the quick toy world (a temporary HYLO_LAB_HOME) against a temporary
sqlite MLflow, leaving a FINISHED run with the metrics and figures it promises.

00_quickstart.ipynb is only checked for its parameters cell here: tests/test_demo.py executes it through
`hylo-lab demo --quick`.

Time on 2 cores: one quick toy world shared by every notebook, then two lanes in parallel (threads waiting on
papermill subprocesses, one torch thread each): 02_distill -> 03_long_context_eval on the model 02 trained;
01_upcycle as the single point of a sweep -> 05_compare_runs on that sweep -> 04_efficiency.
"""
import ast
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXECUTED_ELSEWHERE = {"00_quickstart"}  # tests/test_demo.py (`hylo-lab demo --quick`)
SWEEP_PARAMETERS = ("run_id", "parent_run_id", "experiment", "tracking_uri")


def parameters_cells(path):
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    return nb, [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]


def test_the_issue_7_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} >= {"01_upcycle", "02_distill", "03_long_context_eval", "04_efficiency",
                                           "05_compare_runs"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_has_exactly_one_parameters_cell(path):
    nb, cells = parameters_cells(path)
    assert len(cells) == 1, f"{path.name}: {len(cells)} cells tagged `parameters`, want exactly one"
    assert cells[0].cell_type == "code"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_follow_the_sweep_convention_and_stay_thin(path):
    """A sweep injects run_id, parent_run_id, experiment and tracking_uri; papermill must parse every parameter
    line (it silently skips lines it cannot read, e.g. with '=' in the comment); committed without outputs;
    no def or class (logic lives in hylo_lab, where tests reach it)."""
    import papermill

    from hylo_lab.sweep import notebook_parameters

    declared = notebook_parameters(path)
    assert set(SWEEP_PARAMETERS) <= set(declared), f"missing {set(SWEEP_PARAMETERS) - set(declared)}"
    parsed = papermill.inspect_notebook(str(path))
    assert set(parsed) == set(declared), f"papermill cannot read {set(declared) - set(parsed)}"
    nb, _ = parameters_cells(path)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: commit without outputs"
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        defs = [n for n in ast.walk(ast.parse(code)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        assert not defs, f"{path.name}: `{defs[0].name}` is defined in a notebook; move it into hylo_lab"


# ---------------------------------------------------------------------------------------------------------------
# Execution


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A quick toy world in a temporary HYLO_LAB_HOME and a temporary sqlite MLflow, for every notebook."""
    from hylo_lab.data.toy import get_toy_world

    root = tmp_path_factory.mktemp("notebooks")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = dict(os.environ, HYLO_LAB_HOME=str(root / "home"), MLFLOW_TRACKING_URI=uri, HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ASYNC_LOGGING="false")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYLO_LAB_HOME", env["HYLO_LAB_HOME"])
        get_toy_world(teachers=("llama-s",), quick=True, progress=False)
    return dict(root=root, uri=uri, env=env)


def papermill(lab, name, **params):
    out = lab["root"] / f"{name}.ipynb"
    params = dict(tracking_uri=lab["uri"], quick=True, **params)
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"), str(out),
           "-y", yaml.safe_dump(params), "--no-progress-bar", "--cwd", str(lab["root"])]
    done = subprocess.run(cmd, env=lab["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{name} failed (executed copy: {out}):\n{done.stderr[-4000:]}"
    return out


def sweep_upcycle(lab):
    """01_upcycle as the one point of a sweep, the way `hylo-lab sweep` runs ablations."""
    path = lab["root"] / "nb_sweep.yaml"
    path.write_text(yaml.safe_dump(dict(
        name="nb_upcycle", notebook=str(ROOT / "notebooks" / "01_upcycle.ipynb"), experiment="nb_sweep",
        fixed=dict(quick=True, kinds="mla,gdn", calib_tokens=128, calib_len=64), grid=dict(linear=["gdn"]),
        metrics=["init/kl/hybrid"], plots=[dict(x="linear", y="init/kl/hybrid", kind="bar", name="init_kl")])))
    cmd = [sys.executable, "-m", "hylo_lab.cli", "sweep", str(path), "--tracking-uri", lab["uri"],
           "--out-dir", str(lab["root"] / "sweep")]
    done = subprocess.run(cmd, env=lab["env"], capture_output=True, text=True, timeout=600, cwd=lab["root"])
    assert done.returncode == 0, f"sweep of 01_upcycle failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def lane_distill(lab):
    distill_dir = lab["root"] / "distill"
    papermill(lab, "02_distill", out_dir=str(distill_dir), teacher="", seq_len=64, ild_steps=2, kd_steps=2,
              batch_size=2, eval_every=0)
    papermill(lab, "03_long_context_eval", models=f"toy:llama-s,{distill_dir / 'kd' / 'final'}",
              labels="teacher,student", lengths="128", tasks="niah_single_1", depths="0,1", num_samples=1)


def lane_sweep(lab):
    sweep_upcycle(lab)
    papermill(lab, "05_compare_runs", sweep="nb_upcycle", out_dir=str(lab["root"] / "compare"),
              paired="linear=gdn | linear=gdn")
    papermill(lab, "04_efficiency", models="toy:llama-s", hybrid_mla_layers="1", lengths="32,64", decode_tokens=2,
              prefill_chunk=32)


def run_lanes(lab, *lanes):
    errors = {}

    def run(lane):
        try:
            lane(lab)
        except BaseException as exc:  # reported below, in the test's thread
            errors[lane.__name__] = exc

    threads = [threading.Thread(target=run, args=(lane,)) for lane in lanes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


# What each notebook's run must hold: metrics (exact names) and figures/ artifacts.
EXPECTED = {
    "01_upcycle": (["init/kl/hybrid", "init/kl/mla/0", "init/kl/gdn/3", "upcycle/kept_energy/kv/1", "upcycle/params"],
                   {"svd_spectra.png", "layer_kl.png"}),
    "02_distill": (["distill/kd/eval_kl", "distill/ild/mla/eval_kl", "distill/ild/gdn/steps", "train/kd/loss",
                    "eval/ild/gdn/kl"], {"loss.png"}),
    "03_long_context_eval": (["summary/ruler/teacher", "summary/ruler/student", "summary/niah/student",
                              "eval/ruler/student/128/niah_single_1", "eval/niah/teacher/128/1"],
                             {"ruler.png", "niah.png", "ruler_student.png", "niah_teacher.png"}),
    "04_efficiency": (["summary/llama-s/cache_mib", "summary/llama-s-hybrid/tpot_s",
                       "eval/efficiency/llama-s-hybrid/64/ttft_s"], {"efficiency.png"}),
    "05_compare_runs": (["compare/points", "compare/finished", "compare/failed"], {"sweep_overview.png"}),
}


def test_notebooks_run_under_papermill_and_log_to_mlflow(lab, subtests):
    import mlflow

    from hylo_lab.tracking import find_runs

    errors = run_lanes(lab, lane_distill, lane_sweep)
    assert not errors, "\n\n".join(f"{k}: {v}" for k, v in errors.items())

    client = mlflow.MlflowClient(lab["uri"])
    for name, (metrics, figures) in EXPECTED.items():
        with subtests.test(notebook=name):
            runs = find_runs(None, f"tags.notebook = 'notebooks/{name}.ipynb'", tracking_uri=lab["uri"])
            runs = [r for r in runs if r["tags"].get("sweep_role") != "parent"]
            assert len(runs) == 1, f"{name}: {len(runs)} runs"
            run = runs[0]
            assert run["status"] == "FINISHED"
            missing = [m for m in metrics if m not in run["metrics"]]
            assert not missing, f"{name} did not log {missing}; it logged {sorted(run['metrics'])[:40]}"
            assert run["params"], f"{name} logged no params"
            logged = {Path(a.path).name for a in client.list_artifacts(run["run_id"], "figures")}
            assert figures <= logged, f"{name}: figures {figures - logged} missing from {logged}"

    with subtests.test("01_upcycle ran as a sweep's child run"):
        (child,) = find_runs("nb_sweep", "tags.sweep_name = 'nb_upcycle' AND tags.point_key = 'linear=gdn'",
                             tracking_uri=lab["uri"])
        assert child["params"]["kinds"] == "mla,gdn" and child["params"]["calib_len"] == "64"
        assert child["metrics"]["init/kl/hybrid"] > 0

    with subtests.test("05_compare_runs read the sweep back and drew its plots"):
        (run,) = find_runs("compare", "", tracking_uri=lab["uri"])
        assert run["params"]["sweep"] == "nb_upcycle"
        assert run["metrics"]["compare/points"] == 1 and run["metrics"]["compare/finished"] == 1
        assert {p.name for p in (lab["root"] / "compare").iterdir()} == {"init_kl.png", "runs.csv", "aggregates.csv",
                                                                          "aggregates.md", "paired.csv"}
        shown = json.dumps(nbformat.read(lab["root"] / "05_compare_runs.ipynb", as_version=4).cells)
        for text in ("mean over seeds [95% CI] n", "linear=gdn - linear=gdn, init/kl/hybrid: 0 n=1", "<th>high</th>",
                     "<th>seeds</th>"):
            assert text in shown, f"the executed 05_compare_runs does not show {text!r}"

    with subtests.test("02_distill's model was the one 03_long_context_eval evaluated"):
        (distill,) = find_runs("distill", "", tracking_uri=lab["uri"])
        final = Path(distill["tags"]["final_model"])
        assert final == lab["root"] / "distill" / "kd" / "final" and (final / "model.safetensors").is_file()
        (evaluation,) = find_runs("long_context", "", tracking_uri=lab["uri"])
        assert str(final) in evaluation["params"]["models"]
