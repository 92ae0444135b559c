"""Running a sweep: one papermill execution per point (in this process, a spawned pool or an executor such as
Ray), each in its child MLflow run under the sweep's parent; finished points skipped, results exported, the
summary printed and the aggregates over seeds logged to the parent."""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path

from .runs import child_runs, display_path, export_as_run, find_parent, runs_frame
from .spec import Sweep, SweepError, check_recipe_fields, load_sweep, params_hash, point_key

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)[:150] or "point"


def _describe(exc) -> str:
    """A notebook's own traceback for a cell that raised (papermill), else this process's."""
    if hasattr(exc, "ename") and hasattr(exc, "traceback"):
        return _ANSI.sub("", f"{exc.ename}: {exc.evalue}\n\n" + "\n".join(exc.traceback))
    return "".join(traceback.format_exception(exc))


def run_point(task: dict) -> dict:
    """One point, in this process or a pool worker: create the child run, execute the notebook into it with
    papermill, keep the executed notebook (and a traceback if it failed), set the run's final status."""
    import logging

    import papermill

    from ..tracking import Tracker

    logging.getLogger("papermill").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    tracker = Tracker(task["experiment"], task["key"], tracking_uri=task["tracking_uri"], tags=task["tags"],
                      parent_run_id=task["parent_run_id"], enabled=task.get("track", True))
    if task.get("track", True) and not tracker.active:
        return dict(key=task["key"], run_id=None, status="FAILED", duration_s=0.0,
                    error="could not create the child run in MLflow (see the warning above)")
    params = {**task["parameters"], "run_id": tracker.run_id or "", "parent_run_id": task["parent_run_id"],
              "experiment": task["experiment"], "tracking_uri": task["tracking_uri"]}
    tracker.log_dict(params, "parameters.json", "notebook")
    from ..executors import where_it_ran

    where = where_it_ran()
    tracker.set_tags({f"ran_on.{k}": v for k, v in where.items()})
    output = Path(task["output"])
    output.unlink(missing_ok=True)
    status, error = "FINISHED", ""
    try:
        papermill.execute_notebook(task["notebook"], str(output), parameters=params, kernel_name=task["kernel_name"],
                                   progress_bar=False, log_output=False, cwd=task["cwd"])
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except Exception as exc:  # a cell raised or the kernel died: record it and let the sweep go on
        status, error = "FAILED", _describe(exc)
    duration = time.perf_counter() - t0
    if output.exists():
        tracker.log_artifact(output, "notebook")
    if error:
        trace = output.with_suffix(".traceback.txt")
        trace.write_text(error)
        tracker.log_artifact(trace, "notebook")
        tracker.set_tags({"error": error[-4000:]})
    tracker.set_tags({"duration_s": f"{duration:.1f}", "executed_notebook": str(output.resolve())})
    tracker.end(status)
    first_line = error.strip().splitlines()[0] if error.strip() else ""
    return dict(key=task["key"], run_id=tracker.run_id, status=status, duration_s=duration, error=first_line,
                where=where)


def _open_parent(sweep: Sweep, uri: str):
    from ..tracking import Tracker

    tags = dict(sweep_name=sweep.name, sweep_role="parent", notebook=display_path(sweep.notebook),
                sweep_file=display_path(sweep.path), sweep_spec=json.dumps(sweep.spec()))
    try:
        found = find_parent(sweep.name, sweep.experiment, uri)
    except Exception as exc:  # a store that passed the probe but fails to answer: go on without tracking
        print(f"[hylo_lab] MLflow unavailable, the sweep runs without tracking: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return None
    if found:
        parent = Tracker(sweep.experiment, tracking_uri=uri, run_id=found["run_id"])
        parent.set_status("RUNNING")
        parent.set_tags(tags)
    else:
        parent = Tracker(sweep.experiment, sweep.name, tracking_uri=uri, tags=tags)
    if not parent.active:
        return None
    parent.log_artifact(sweep.path, "sweep")
    return parent


def run_sweep(path, *, jobs: int = 1, dry_run: bool = False, only: dict | None = None, out_dir=None,
              tracking_uri: str | None = None, kernel_name: str | None = None, echo=print, executor=None,
              seeds: list[int] | None = None, points_dir=None):
    """Run every point of a sweep file (see the module docstring); returns the summary DataFrame (point, axes,
    status FINISHED / FAILED / SKIPPED / PLANNED, duration_s, run_id, metrics). Executed notebooks are kept in
    `out_dir` (default runs/sweeps/<name>/) and logged to their child runs under notebook/. `out_dir` is locked
    while the sweep runs (a second sweep into it is refused); with MLflow unavailable (tracking.store_problem) every
    point still runs, untracked. `seeds` replaces the file's seeds; each point's result is exported to
    `points_dir` (default Sweep.points_dir) and a point exported there as FINISHED with the same parameters is
    skipped."""
    import pandas as pd

    from ..outputs import check_writable, locked
    from ..tracking import default_tracking_uri, store_problem

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"--jobs {jobs!r}: give a positive number of parallel points")
    sweep = load_sweep(path, seeds=seeds)
    points = sweep.select(only)
    check_recipe_fields(sweep, points)
    points_dir = Path(points_dir or sweep.points_dir).resolve()
    uri = tracking_uri or default_tracking_uri()
    out_dir = Path(out_dir or Path("runs") / "sweeps" / sweep.name).resolve()

    if dry_run:
        echo(f"sweep {sweep.name!r}: {sweep.notebook} -> experiment {sweep.experiment!r} at {uri}")
        echo(f"fixed: {json.dumps(sweep.fixed)}")
        echo(f"{len(points)} point(s), executed notebooks in {out_dir}")
        plan = pd.DataFrame([dict(point=point_key(p), **sweep.axis_values(p), status="PLANNED") for p in points])
        echo(plan.to_string(index=False))
        return plan

    if out_dir.exists() and not out_dir.is_dir():
        raise SweepError(f"--out-dir {out_dir} is a file; give a folder")
    check_writable(out_dir, "--out-dir")
    check_writable(points_dir, "the exported points' folder")
    with locked(out_dir, f"hylo-lab sweep {sweep.name}"):
        out_dir.mkdir(parents=True, exist_ok=True)
        problem = store_problem(uri)
        if problem:  # run every point anyway: the notebooks' own Trackers go on without logging too
            print(f"[hylo_lab] MLflow unavailable, the sweep runs without tracking (points resume and report "
                  f"metrics from the exported files only): {problem}", file=sys.stderr)
        parent = None if problem else _open_parent(sweep, uri)
        return _run_points(sweep, points, parent, uri, out_dir, jobs, kernel_name, echo, executor, points_dir)


def progress_line(done: int, total: int, elapsed: float, durations: list[float], jobs: int) -> str:
    """The sweep's overall line: points done / total, wall time elapsed and an estimate of what is left,
    left = mean(durations of the finished points) x points left / min(jobs, points left)."""
    from ..progress import format_seconds

    left = total - done
    if not left:
        return f"[sweep {done}/{total} done in {format_seconds(elapsed)}]"
    estimate = sum(durations) / len(durations) * left / min(jobs, left) if durations else None
    rest = f"about {format_seconds(estimate)} left" if estimate is not None else "estimate after the first point"
    return f"[sweep {done}/{total} | {format_seconds(elapsed)} elapsed, {rest}]"


def _run_points(sweep: Sweep, points: list[dict], parent, uri: str, out_dir: Path, jobs: int, kernel_name, echo,
                executor=None, points_dir: Path | None = None):
    """run_sweep's work once the folder is locked; `parent` None: MLflow is unavailable, nothing is tracked."""
    axes = sweep.axes
    finished = {}
    for run in child_runs(parent.run_id, sweep.experiment, uri) if parent else []:
        if run["status"] == "FINISHED":
            finished.setdefault((run["tags"].get("point_key"), run["tags"].get("params_hash")), run)

    from ..executors import export_result, read_exports

    points_dir = Path(points_dir or sweep.points_dir)
    exported = read_exports(points_dir)
    tasks, skipped, from_exports = [], {}, {}
    for p in points:
        key, params = point_key(p), sweep.parameters(p)
        digest = params_hash(params)
        if (key, digest) in finished:
            skipped[key] = finished[(key, digest)]["run_id"]
            continue
        done = exported.get(key, {})
        if done.get("status") == "FINISHED" and done.get("params_hash") == digest:
            skipped[key] = done.get("run_id")
            from_exports[key] = export_as_run(done)
            continue
        if "out_dir" in sweep.declared and "out_dir" not in params:
            params["out_dir"] = str(out_dir / slug(key))
        shown = sweep.axis_values(p)
        tags = dict(sweep_name=sweep.name, point_key=key, params_hash=digest, sweep_point=json.dumps(shown),
                    notebook=display_path(sweep.notebook), **{k: str(v) for k, v in shown.items()})
        tasks.append(dict(key=key, parameters=params, tags=tags, experiment=sweep.experiment, tracking_uri=uri,
                          parent_run_id=parent.run_id if parent else "", track=parent is not None,
                          notebook=str(sweep.notebook),
                          output=str(out_dir / f"{slug(key)}.ipynb"), kernel_name=kernel_name, cwd=None))

    echo(f"sweep {sweep.name!r}: {len(points)} point(s), {len(skipped)} already finished, running {len(tasks)} "
         f"with {min(jobs, max(len(tasks), 1))} job(s); "
         + (f"parent run {parent.run_id} in experiment {sweep.experiment!r} at {uri}" if parent else "not tracked"))
    results = {}
    by_key = {t["key"]: t for t in tasks}
    t0 = time.perf_counter()
    try:
        for i, result in enumerate((executor or _execute)(tasks, jobs), 1):  # executor: executors.RayExecutor
            results[result["key"]] = result
            export_result(by_key[result["key"]], result, points_dir)
            note = f"  ({result['error']})" if result["error"] else ""
            echo(f"[{i}/{len(tasks)}] {result['key']}: {result['status']} in {result['duration_s']:.1f} s{note}")
            durations = [r["duration_s"] for r in results.values()]
            echo(progress_line(i, len(tasks), time.perf_counter() - t0, durations, jobs))
    except KeyboardInterrupt:
        if parent:
            parent.end("KILLED")
        raise
    if parent is None:  # the exports hold what the notebooks left in their out_dir (metrics.json, summary.json)
        exported, rows = read_exports(points_dir), []
        for p in points:
            key = point_key(p)
            run = export_as_run(exported[key]) if key in exported else dict(
                run_id=None, status=results[key]["status"], metrics={},
                tags={"duration_s": f"{results[key]['duration_s']:.1f}"})
            rows.append(dict(run, tags={**run["tags"], "point_key": key,
                                        "sweep_point": json.dumps(sweep.axis_values(p))}))
        summary = runs_frame(rows, axes, sweep.metrics, newest_first=False)
        summary.loc[summary.point.isin(list(skipped)), "status"] = "SKIPPED"
        summary.attrs.update(parent_run_id=None, tracking_uri=uri, out_dir=str(out_dir), points_dir=str(points_dir))
        return _report(summary, out_dir, echo)

    runs = child_runs(parent.run_id, sweep.experiment, uri)
    latest = runs_frame(runs, axes)
    latest = latest[latest.point.isin([point_key(p) for p in sweep.points()])]  # not points since removed

    by_id = {r["run_id"]: r for r in runs}
    rows = []
    for p in points:
        key = point_key(p)
        run_id = skipped.get(key) or results.get(key, {}).get("run_id")
        run = by_id.get(run_id) or from_exports.get(key) or dict(run_id=run_id, status="FAILED", tags={}, metrics={})
        rows.append(dict(run, tags={**run["tags"], "point_key": key, "sweep_point": json.dumps(sweep.axis_values(p))}))
    summary = runs_frame(rows, axes, sweep.metrics, newest_first=False)
    _log_aggregates(parent, summary, sweep, out_dir)
    parent.end("FAILED" if (latest.status == "FAILED").any() else "FINISHED")
    summary.loc[summary.point.isin(list(skipped)), "status"] = "SKIPPED"
    summary.attrs.update(parent_run_id=parent.run_id, tracking_uri=uri, out_dir=str(out_dir),
                         points_dir=str(points_dir))
    return _report(summary, out_dir, echo)


def _log_aggregates(parent, summary, sweep: Sweep, out_dir: Path) -> None:
    """The parent run's tables/aggregates.csv: mean over seeds, 95% CI and n per point and metric."""
    from ..compare import aggregate

    metrics = [c for c in summary.columns if c not in ("point", *sweep.axes, "status", "duration_s", "run_id")]
    table = aggregate(summary, sweep.axes, metrics)
    if table.empty:
        return
    path = out_dir / "aggregates.csv"
    table.to_csv(path, index=False)
    parent.log_artifact(path, "tables")


def _report(summary, out_dir: Path, echo):
    """Prints the summary table and which points failed; returns the summary."""
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        echo(summary.drop(columns=["run_id"]).to_string(index=False))
    failed = summary.point[summary.status == "FAILED"].tolist()
    if failed:
        echo(f"{len(failed)} point(s) failed: {', '.join(failed)}; tracebacks in {out_dir}/*.traceback.txt and in "
             f"each run's notebook/ artifacts")
    return summary


def _execute(tasks: list[dict], jobs: int):
    """Yields each task's result as it completes: in this process for one job, else in spawned processes
    (not forked: the parent holds MLflow's database connections)."""
    if jobs <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield run_point(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_point, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker itself died; the point's run (if any) stays RUNNING
                yield dict(key=futures[future]["key"], run_id=None, status="FAILED", duration_s=0.0,
                           error=f"worker failed: {type(exc).__name__}: {exc}")
