"""Sweeps: validation before anything runs, grid expansion, one end-to-end sweep through papermill and MLflow
(parent + children, a failing point, a re-run that skips finished points, compare), and the ablation files."""
from pathlib import Path

import pytest
import yaml

from hylo_lab import cli
from hylo_lab.sweep import Param, SweepError, load_sweep, notebook_parameters, parse_only, run_sweep

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
TINY_NB = DATA / "tiny_sweep.ipynb"
TINY_YAML = DATA / "tiny_sweep.yaml"
ABLATIONS = sorted((ROOT / "ablations").glob("*.yaml"))

# What notebooks/00_quickstart.ipynb declares (issue 7); checks the ablation files until the notebook exists.
QUICKSTART = dict(run_id="", parent_run_id="", experiment="quickstart", tracking_uri="", seed=0, world_seed=0,
                  quick=True, overrides="", yarn_eval="fixed", eval_samples=-1, long_eval_samples=8,
                  eval_lengths="", ppl_tokens=-1, out_dir="")


def write_sweep(tmp_path, **overrides):
    spec = dict(name="t", notebook=str(TINY_NB), experiment="tiny_sweep", fixed={"scale": 0.5}, grid={"x": [1, 2]},
                metrics=["score"], plots=[{"x": "x", "y": "score", "kind": "bar"}])
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_notebook_parameters_reads_names_types_and_defaults():
    params = notebook_parameters(TINY_NB)
    assert list(params)[:4] == ["run_id", "parent_run_id", "experiment", "tracking_uri"]
    assert params["x"] == Param("x", int, 1)
    assert params["scale"] == Param("scale", float, 1.0)
    assert params["fail"] == Param("fail", bool, False)
    assert params["experiment"].default == "tiny_sweep"


@pytest.mark.parametrize("overrides, message", [
    (dict(grids={"x": [1]}), "unknown key 'grids' (did you mean 'grid'?)"),
    (dict(notebook="nowhere/missing.ipynb"), "notebook 'nowhere/missing.ipynb' not found"),
    (dict(grid={}), "grid is empty"),
    (dict(grid={"x": 3}), "grid.x must be a non-empty list of values; put a single value under fixed"),
    (dict(grid={"y": [1, 2]}), "grid.y: not a parameter of tiny_sweep.ipynb"),
    (dict(fixed={"scael": 2.0}), "fixed.scael: not a parameter of tiny_sweep.ipynb (did you mean 'scale'?)"),
    (dict(grid={"x": [1, "two"]}), "grid.x: 'two' is a str but the notebook declares x: int"),
    (dict(fixed={"fail": "yes"}), "fixed.fail: 'yes' is a str but the notebook declares fail: bool"),
    (dict(fixed={"run_id": "abc"}), "fixed.run_id: set by the sweep itself"),
    (dict(fixed={"x": 1}), "'x' is both fixed and a grid axis"),
    (dict(seeds=[0, "1"]), "seeds must be a list of integers"),
    (dict(name="has space"), "name 'has space' must be letters"),
    (dict(experiment=None), "missing required key 'experiment'"),
    (dict(plots=[{"x": "length", "y": "score"}]), "plots[0]: x='length' is not a column"),
    (dict(plots=[{"x": "x", "y": "score", "kind": "pie"}]), "plots[0]: kind 'pie' is not one of"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_sweep_files_fail_before_running_with_clear_messages(tmp_path, overrides, message):
    path = write_sweep(tmp_path, **overrides)
    with pytest.raises(SweepError) as err:
        run_sweep(path, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", out_dir=tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once(tmp_path):
    path = write_sweep(tmp_path, grid={"x": [1], "y": [2]}, fixed={"scale": "big"}, extra=1)
    with pytest.raises(SweepError, match="3 problems") as err:
        load_sweep(path)
    assert str(err.value).count("\n  - ") == 3


def test_notebook_without_the_sweep_parameters_is_refused(tmp_path):
    import nbformat

    nb = nbformat.read(TINY_NB, as_version=4)
    nb.cells[1].source = "x: int = 1\nscale: float = 1.0\n"
    nbformat.write(nb, tmp_path / "bare.ipynb")
    with pytest.raises(SweepError, match="must declare run_id, parent_run_id, experiment, tracking_uri"):
        load_sweep(write_sweep(tmp_path, notebook="bare.ipynb"))


def test_points_cross_grid_include_and_seeds_with_stable_keys(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, grid={"x": [1, 2], "label": ["a", "b"]}, seeds=[0, 1],
                                   include=[{"x": 9, "fail": True}], fixed={"scale": 2}))
    keys = [";".join(f"{k}={v}" for k, v in p.items()) for p in sweep.points()]
    assert keys[:2] == ["x=1;label=a;seed=0", "x=1;label=a;seed=1"]
    assert keys[-1] == "x=9;fail=True;seed=1" and len(keys) == 10
    assert sweep.fixed["scale"] == 2.0 and isinstance(sweep.fixed["scale"], float)  # int YAML value, float param
    assert sweep.axes == ["x", "label", "fail", "seed"]
    assert sweep.axis_values({"x": 1, "label": "a", "seed": 0}) == dict(x=1, label="a", fail=False, seed=0)
    # --only values arrive as strings and are read as the declared type; same key = any of, keys = all of
    chosen = sweep.select(parse_only(["x=2", "x=9", "seed=1"]))
    assert [(p["x"], p["seed"]) for p in chosen] == [(2, 1), (2, 1), (9, 1)]
    assert len(sweep.select({"fail": "false"})) == 8
    with pytest.raises(SweepError, match="matches none"):
        sweep.select({"x": "5"})
    with pytest.raises(SweepError, match="not a parameter"):
        sweep.select({"nope": "1"})
    # two extra points setting the same key give that key one column (compare melts on these columns)
    twice = load_sweep(write_sweep(tmp_path, include=[{"x": 7, "label": "c"}, {"x": 8, "label": "d"}]))
    assert twice.axes == ["x", "label"]
    # a sweep of extra points only runs those points, not also an empty grid point
    only = load_sweep(write_sweep(tmp_path, grid=None, include=[{"x": 3}], seeds=[0, 1]))
    assert only.points() == [{"x": 3, "seed": 0}, {"x": 3, "seed": 1}]


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, capsys):
    path = write_sweep(tmp_path, seeds=[0, 1])
    cli.main(["sweep", str(path), "--dry-run", "--only", "seed=1", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out = capsys.readouterr().out
    assert "2 point(s)" in out and "x=1;seed=1" in out and "PLANNED" in out and "x=1;seed=0" not in out
    assert not (tmp_path / "m.db").exists()


def test_dry_run_names_a_typo_in_a_dotted_recipe_key(tmp_path, capsys):
    """The quickstart's recipe checker runs on every point's overrides before anything runs (no weights)."""
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(dict(name="typo", notebook=str(ROOT / "notebooks" / "00_quickstart.ipynb"),
                                        experiment="t", fixed={"quick": True},
                                        grid={"stages.kd-long.stepz": [10], "stages.kd-long.steps": [5, 6]})))
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", str(path), "--dry-run", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "stepz" in err and "did you mean 'steps'" in err
    assert not (tmp_path / "m.db").exists()


def test_cli_reports_a_bad_sweep_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", str(write_sweep(tmp_path, grid={})), "--dry-run"])
    assert exc.value.code == 2 and "grid is empty" in capsys.readouterr().err


def test_pattern_plot_melts_metrics_into_a_length_axis():
    import pandas as pd

    from hylo_lab.compare import figure_name, long_form, plot_sweep

    frame = pd.DataFrame(dict(point=["a", "b", "c"], layout=["1MLA3GDN", "2MLA2GDN", "2MLA2GDN"],
                              status=["FINISHED", "FINISHED", "FAILED"], **{"eval/niah/256": [0.5, 0.75, None],
                              "eval/niah/512": [0.25, 0.5, None], "eval/niah/256/0.5": [1.0, 1.0, None]}))
    long, y, x = long_form(frame, "eval/niah/{length}")
    assert (y, x) == ("eval/niah", "length")
    assert sorted(long.length.unique()) == [256, 512] and len(long) == 6  # the per-depth metric is not a length
    spec = {"x": "length", "y": "eval/niah/{length}", "hue": "layout", "kind": "line"}
    fig = plot_sweep(frame, spec, title="t")
    assert fig.axes[0].get_title() == "t: eval/niah vs length"
    assert len(fig.axes[0].get_lines()) >= 2  # one line per layout; the FAILED row is left out
    assert figure_name(spec) == "eval_niah_vs_length_by_layout"


def test_sweep_end_to_end_parent_children_failure_rerun_and_compare(tmp_path):
    """tiny_sweep.yaml: x=1 and x=2 log metrics, x=3 raises. The first run records 2 FINISHED + 1 FAILED
    children under one parent; a re-run skips the two finished points and re-runs only the failed one."""
    import mlflow

    from hylo_lab.compare import compare

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "notebooks"
    points = tmp_path / "points"
    printed = []
    first = run_sweep(TINY_YAML, tracking_uri=uri, out_dir=out, echo=printed.append, points_dir=points)

    assert first.point.tolist() == ["x=1", "x=2", "x=3;fail=True"]
    overall = [line for line in printed if line.startswith("[sweep ")]
    assert [line.split(" |")[0].split(" done")[0] for line in overall] == ["[sweep 1/3", "[sweep 2/3", "[sweep 3/3"]
    assert "left]" in overall[0] and "done in" in overall[-1]
    assert first.status.tolist() == ["FINISHED", "FINISHED", "FAILED"]
    assert first["score"].tolist()[:2] == [0.5, 1.0]  # x * scale, scale=0.5 fixed in the YAML
    assert first["eval/niah/128"].tolist()[:2] == pytest.approx([0.1, 0.2])

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("tiny_sweep")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_name == "tiny" and parents[0].info.status == "FAILED"
    parent_id = parents[0].info.run_id
    children = {r.data.tags["point_key"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"x=1", "x=2", "x=3;fail=True"} and len(runs) == 4
    good = children["x=2"]
    assert good.info.status == "FINISHED" and good.info.run_name == "x=2"
    assert good.data.tags["x"] == "2" and good.data.tags["sweep_name"] == "tiny" and good.data.tags["fail"] == "False"
    assert good.data.metrics == {"score": 1.0, "eval/niah/128": 0.2, "eval/niah/256": 0.1, "eval/niah/512": 0.05}
    assert good.data.params["scale"] == "0.5"  # logged by the notebook's own Tracker into the sweep's child run
    assert {a.path for a in client.list_artifacts(good.info.run_id, "notebook")} == {
        "notebook/x=2.ipynb", "notebook/parameters.json"}

    bad = children["x=3;fail=True"]
    assert bad.info.status == "FAILED" and not bad.data.metrics
    assert "ValueError: asked to fail (x=3, label=b)" in bad.data.tags["error"]
    assert {a.path for a in client.list_artifacts(bad.info.run_id, "notebook")} >= {
        "notebook/x=3_fail=True.ipynb", "notebook/x=3_fail=True.traceback.txt"}
    assert (out / "x=3_fail=True.ipynb").exists() and (out / "x=1.ipynb").exists()

    second = run_sweep(TINY_YAML, tracking_uri=uri, out_dir=out, echo=lambda *a: None, points_dir=points)
    assert second.status.tolist() == ["SKIPPED", "SKIPPED", "FAILED"]
    assert second.run_id.tolist()[:2] == first.run_id.tolist()[:2]
    assert second["score"].tolist()[:2] == [0.5, 1.0]
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 5  # the same parent, one new child for the failed point only
    assert sum(r.data.tags.get("sweep_role") == "parent" for r in runs) == 1

    frame, figures = compare(TINY_YAML, tracking_uri=uri, out_dir=tmp_path / "results")
    assert frame.point.tolist() == ["x=1", "x=2", "x=3;fail=True"] and frame.run_id.iloc[2] == second.run_id.iloc[2]
    assert len(figures) == 2
    assert {p.name for p in (tmp_path / "results").iterdir()} == {
        "eval_niah_vs_length_by_x.png", "score_by_x.png", "runs.csv", "aggregates.csv", "aggregates.md"}
    logged = {a.path for a in client.list_artifacts(parent_id, "figures")}
    assert logged == {"figures/eval_niah_vs_length_by_x.png", "figures/score_by_x.png"}
    by_name, _ = compare("tiny", tracking_uri=uri, out_dir=tmp_path / "by_name", log=False)
    assert by_name.drop(columns="duration_s").equals(frame.drop(columns="duration_s"))


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.stem)
def test_ablation_files_name_only_parameters_their_notebook_declares(path):
    notebook = ROOT / yaml.safe_load(path.read_text())["notebook"]
    declared = None if notebook.exists() else {k: Param(k, type(v), v) for k, v in QUICKSTART.items()}
    sweep = load_sweep(path, declared=declared)
    assert sweep.name == path.stem and sweep.metrics and sweep.plots and sweep.paper_finding
    assert len(sweep.seeds) >= 3, "at least 3 seeds per point (issue 16)"
    assert 2 <= len(sweep.points()) // len(sweep.seeds) <= 8, "keep the grid small enough for the toy world on CPU"
    from hylo_lab.demo import DemoSettings

    for point in sweep.points():  # every recipe field the YAML sets passes the recipe checker
        settings = DemoSettings(**sweep.parameters(point))
        layout = point.get("student.layout", settings.student_layout)
        assert settings.student_layout == layout and settings.mixers.count("mla") == int(layout[0])


def test_the_four_ablations_exist():
    assert {p.stem for p in ABLATIONS} == {"layer_ratio", "yarn", "teacher_size", "training_length"}


def test_parallel_jobs_run_points_in_separate_processes(tmp_path):
    # both points fail in their first cell, so this times process start-up, not the notebook
    import mlflow

    path = write_sweep(tmp_path, fixed={"fail": True}, grid={"x": [3, 4]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(path, jobs=2, tracking_uri=uri, out_dir=tmp_path / "out", echo=lambda *a: None)
    assert summary.point.tolist() == ["x=3", "x=4"] and summary.status.tolist() == ["FAILED", "FAILED"]
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny_sweep").experiment_id])
    errors = sorted(r.data.tags.get("error", "").splitlines()[0] for r in runs if "point_key" in r.data.tags)
    assert errors == ["ValueError: asked to fail (x=3, label=a)", "ValueError: asked to fail (x=4, label=a)"]


SEED_YAML = DATA / "seed_sweep.yaml"


def test_seeds_make_points_x_2_child_runs_sharing_one_teacher(tmp_path, monkeypatch):
    """seed_sweep.yaml: x in [1, 2] x seeds [0, 1] -> 4 child runs tagged seed, one quick toy world and one
    teacher built once (world_seed), while each child's recipe takes its own seed."""
    import mlflow

    monkeypatch.setenv("HYLO_LAB_HOME", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(SEED_YAML, tracking_uri=uri, out_dir=tmp_path / "nb", points_dir=tmp_path / "points",
                        echo=lambda *a: None)
    assert summary.point.tolist() == ["x=1;seed=0", "x=1;seed=1", "x=2;seed=0", "x=2;seed=1"]
    assert (summary.status == "FINISHED").all()
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("seed_sweep").experiment_id])
    children = [r for r in runs if "point_key" in r.data.tags]
    assert len(children) == 4 and sorted(r.data.tags["seed"] for r in children) == ["0", "0", "1", "1"]
    assert {r.data.tags["recipe_seed"] for r in children} == {"0", "1"}
    assert len({r.data.tags["teacher_dir"] for r in children}) == 1
    teachers = list((tmp_path / "cache").glob("toy-world-quick-*/teachers/*"))
    assert len(teachers) == 1 and (teachers[0] / "done.json").exists()
    agg = pd_read(tmp_path / "nb" / "aggregates.csv")  # the parent's aggregates over the two seeds
    assert agg[agg.metric == "score"][["x", "mean", "n"]].values.tolist() == [[1, 1.5, 2], [2, 2.5, 2]]
    logged = {a.path for a in client.list_artifacts(summary.attrs["parent_run_id"], "tables")}
    assert "tables/aggregates.csv" in logged


def pd_read(path):
    import pandas as pd

    return pd.read_csv(path)


def test_progress_line_estimates_from_finished_points():
    """Two points finished in 10 s and 30 s: six left at two jobs take 3 x 20 s; the last line gives the total."""
    from hylo_lab.sweep import progress_line

    assert progress_line(2, 8, 65.0, [10.0, 30.0], 2) == "[sweep 2/8 | 1:05 elapsed, about 1:00 left]"
    assert progress_line(7, 8, 65.0, [10.0] * 7, 4) == "[sweep 7/8 | 1:05 elapsed, about 0:10 left]"
    assert progress_line(8, 8, 3700.0, [10.0] * 8, 1) == "[sweep 8/8 done in 1:01:40]"


def test_seeds_option_replaces_the_files_seeds(tmp_path, capsys):
    from hylo_lab.sweep import parse_seeds

    path = write_sweep(tmp_path, seeds=[0])
    assert load_sweep(path).seeds == [0] and load_sweep(path, seeds=[0, 1, 2]).seeds == [0, 1, 2]
    assert len(load_sweep(path, seeds=[3, 4]).points()) == 4
    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds(None) is None
    with pytest.raises(SweepError, match="--seeds 'a,b'"):
        parse_seeds("a,b")
    cli.main(["sweep", str(path), "--dry-run", "--seeds", "5,6", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    out = capsys.readouterr().out
    assert "x=1;seed=5" in out and "x=2;seed=6" in out and "seed=0" not in out
    with pytest.raises(SystemExit) as exc:
        cli.main(["sweep", str(path), "--dry-run", "--seeds", "1,1"])
    assert exc.value.code == 2


def test_exported_points_resume_a_sweep_elsewhere_and_rebuild_runs_csv(tmp_path):
    """Each point is exported as JSON (with where it ran); a sweep against a fresh MLflow store (another machine)
    skips the points exported FINISHED with the same parameters, and compare rebuilds runs.csv from the exports."""
    import json

    from hylo_lab.compare import compare

    points = tmp_path / "points"
    first = run_sweep(TINY_YAML, tracking_uri=f"sqlite:///{tmp_path / 'a.db'}", out_dir=tmp_path / "a",
                      points_dir=points, echo=lambda *a: None)
    files = sorted(p.name for p in points.iterdir())
    assert files == ["x=1.json", "x=2.json", "x=3_fail=True.json"]
    data = json.loads((points / "x=2.json").read_text())
    assert data["status"] == "FINISHED" and data["metrics"]["score"] == 1.0 and data["parameters"]["scale"] == 0.5
    assert set(data["where"]) == {"host", "device", "git_sha"} and data["where"]["git_sha"]
    assert data["axes"] == {"x": 2, "fail": False} and data["params_hash"]
    second = run_sweep(TINY_YAML, tracking_uri=f"sqlite:///{tmp_path / 'b.db'}", out_dir=tmp_path / "b",
                       points_dir=points, echo=lambda *a: None)
    assert second.status.tolist() == ["SKIPPED", "SKIPPED", "FAILED"]
    assert second["score"].tolist()[:2] == [0.5, 1.0]
    changed = write_sweep(tmp_path, name="tiny", grid={"x": [1, 2]}, fixed={"scale": 0.25, "label": "b"})
    third = run_sweep(changed, tracking_uri=f"sqlite:///{tmp_path / 'c.db'}", out_dir=tmp_path / "c",
                      points_dir=points, echo=lambda *a: None)
    assert third.status.tolist() == ["FINISHED", "FINISHED"]  # other parameters: not the exported points
    frame, _ = compare(TINY_YAML, out_dir=tmp_path / "results", points_dir=points)  # no MLflow read
    assert frame.point.tolist() == ["x=1", "x=2", "x=3;fail=True"]
    assert frame.status.tolist()[:2] == ["FINISHED", "FINISHED"] and frame["score"].tolist()[:2] == [0.25, 0.5]
    assert (tmp_path / "results" / "runs.csv").exists() and first.run_id.iloc[0]


def test_an_untracked_sweep_exports_metrics_the_notebooks_left_and_resumes_from_them(tmp_path, capsys):
    """MLflow unavailable (here: the store's path is a folder; on a GPU machine: no mlflow package): every point
    runs untracked, the exports take metrics from the metrics.json each notebook left in its out_dir, the summary
    shows them and a re-run skips the finished points."""
    import json

    folder = tmp_path / "store_is_a_folder"
    folder.mkdir()
    uri, points = f"sqlite:///{folder}", tmp_path / "points"
    first = run_sweep(TINY_YAML, tracking_uri=uri, out_dir=tmp_path / "nb", points_dir=points, echo=lambda *a: None)
    assert "MLflow unavailable" in capsys.readouterr().err
    assert first.status.tolist() == ["FINISHED", "FINISHED", "FAILED"]
    assert first["score"].tolist()[:2] == [0.5, 1.0] and first.run_id.isna().all()
    data = json.loads((points / "x=2.json").read_text())
    assert data["run_id"] is None and data["metrics"] == {
        "score": 1.0, "eval/niah/128": 0.2, "eval/niah/256": 0.1, "eval/niah/512": 0.05}
    second = run_sweep(TINY_YAML, tracking_uri=uri, out_dir=tmp_path / "nb", points_dir=points, echo=lambda *a: None)
    assert second.status.tolist() == ["SKIPPED", "SKIPPED", "FAILED"] and second["score"].tolist()[:2] == [0.5, 1.0]


def fake_frame():
    import pandas as pd

    rows = []
    for layout, base in (("2MLA2GDN", 0.6), ("3MLA1GDN", 0.5)):
        for seed, noise in zip((0, 1, 2), (0.0, 0.1, -0.05)):
            rows.append(dict(point=f"layout={layout};seed={seed}", layout=layout, seed=seed, status="FINISHED",
                             duration_s=1.0, run_id=f"{layout}{seed}", **{"eval/niah/512": base + noise,
                                                                        "eval/ppl/256": 3.0 - base}))
    rows.append(dict(point="layout=1MLA3GDN;seed=0", layout="1MLA3GDN", seed=0, status="FAILED", duration_s=1.0,
                     run_id="x", **{"eval/niah/512": float("nan"), "eval/ppl/256": float("nan")}))
    return pd.DataFrame(rows)


def test_aggregates_are_means_over_seeds_with_intervals():
    from hylo_lab.compare import aggregate
    from hylo_lab.stats import SEED_CI

    agg = aggregate(fake_frame(), ["layout", "seed"])
    row = agg[(agg.layout == "2MLA2GDN") & (agg.metric == "eval/niah/512")].iloc[0]
    assert row["mean"] == pytest.approx(0.6 + 0.05 / 3) and row["n"] == 3 and row["ci"] == SEED_CI
    assert row["low"] < row["mean"] < row["high"]
    assert set(agg.layout) == {"2MLA2GDN", "3MLA1GDN"}  # the failed point has no finished seed


def test_markdown_table_has_a_row_per_point_and_the_chosen_metrics():
    from hylo_lab.compare import aggregate, markdown_table

    agg = aggregate(fake_frame(), ["layout", "seed"])
    lines = markdown_table(agg, ["eval/niah/*"]).splitlines()
    assert lines[0] == "| layout | eval/niah/512 |" and len([x for x in lines if x.startswith("| ")]) == 3
    row = agg[(agg.layout == "3MLA1GDN") & (agg.metric == "eval/niah/512")].iloc[0]
    assert lines[3] == f"| 3MLA1GDN | {row['mean']:.3g} [{row['low']:.3g}, {row['high']:.3g}] |"
    assert "n = [3] seeds per point" in lines[-1]


def test_markdown_table_marks_a_metric_without_any_seed_value():
    from hylo_lab.compare import aggregate, markdown_table

    frame = fake_frame()
    frame.loc[frame.layout == "2MLA2GDN", "eval/ppl/256"] = float("nan")
    lines = markdown_table(aggregate(frame, ["layout", "seed"])).splitlines()
    assert lines[2].startswith("| 2MLA2GDN | ") and lines[2].endswith(" | n=0 |")


def test_paired_selectors_match_unset_axes_and_list_values():
    from hylo_lab.compare import paired, parse_selector

    assert parse_selector("layout=2MLA2GDN;mla_layers=[2, 3]") == {"layout": "2MLA2GDN", "mla_layers": "[2, 3]"}
    assert parse_selector("layout=2MLA2GDN,linear=gdn") == {"layout": "2MLA2GDN", "linear": "gdn"}
    frame = fake_frame()
    frame["mla_layers"] = [None if layout == "2MLA2GDN" else [2, 3] for layout in frame.layout]
    out = paired(frame, "layout=2MLA2GDN;mla_layers=None", "layout=3MLA1GDN;mla_layers=[2, 3]", ["eval/niah/512"])
    assert out["mean"].iloc[0] == pytest.approx(0.1) and out["n"].iloc[0] == 3


def test_paired_comparison_through_compare_on_a_fake_frame(tmp_path, monkeypatch, capsys):
    import pandas as pd

    from hylo_lab import compare as compare_module

    spec = dict(name="fake", axes=["layout", "seed"], metrics=["eval/niah/512"], plots=[])
    frame = fake_frame()
    frame.attrs.update(parent_run_id="p", tracking_uri="none", sweep="fake")
    monkeypatch.setattr(compare_module, "sweep_runs", lambda *a, **k: (frame.copy(), spec, {"run_id": "p"}))
    out, _ = compare_module.compare("fake", out_dir=tmp_path / "r", log=False,
                                    paired_points=[("layout=2MLA2GDN", "layout=3MLA1GDN")])
    paired = pd.read_csv(tmp_path / "r" / "paired.csv")
    row = paired[paired.metric == "eval/niah/512"].iloc[0]
    # every seed differs by exactly 0.1: the paired interval is that point, the unpaired spread is not
    assert row["mean"] == pytest.approx(0.1) and row["low"] == pytest.approx(0.1) and row["n"] == 3
    assert row["high"] == pytest.approx(0.1) and row["seeds"] == "[0, 1, 2]"
    compare_module.print_statistics(out)
    printed = capsys.readouterr().out
    assert "layout=2MLA2GDN - layout=3MLA1GDN, eval/niah/512: 0.1 [0.1, 0.1] n=3" in printed
    assert "mean over seeds [95% CI] n (bootstrap over seeds" in printed
    with pytest.raises(SweepError, match="no finished point matches"):
        compare_module.paired(frame, "layout=1MLA3GDN", "layout=2MLA2GDN")
    with pytest.raises(SweepError, match="matches 2 points per seed"):
        compare_module.paired(frame.assign(layout="same"), "layout=same", "layout=same")
