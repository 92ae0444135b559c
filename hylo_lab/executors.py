"""Where sweep points run: `RayExecutor` sends each (point, seed) to a Ray cluster as one task with declared
resources (`num_gpus` may be fractional: 0.25 packs four points onto one GPU). The local executor (papermill
processes on this machine) stays in sweep/running.py and is the default.

Contract, shared with the local executor (sweep/running.py): called with the sweep's task dicts, it yields one
result dict per task (key, run_id, status, duration_s, error) as tasks complete. Here, besides:
  - the workers log to the tracking URI the driver passes in each task: use one MLflow server every node reaches
    (`mlflow server --backend-store-uri sqlite:///$PWD/mlflow.db --artifacts-destination $PWD/mlartifacts
    --host 0.0.0.0 --port 5000`, then `--tracking-uri http://HEAD:5000`); a sqlite or file URI only works when
    every worker runs on the driver's machine.
  - after each point the driver (sweep.running, for every executor) exports the sweep's
    results/<name>/points/<point>.json (export_result) from what the child run logged in MLflow, so no result lives
    only on a worker's disk; the worker records where it ran (where_it_ran).
  - a worker (or node) that dies mid-point is not retried (max_retries=0): the driver marks the point's child run
    FAILED with an `error` tag saying so, and a re-run of the sweep runs it again (it only skips FINISHED points).
    A point is a notebook with side effects and logged metrics; a silent retry would double-log into one run.
ray is imported only here, lazily (extra `ray`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .outputs import atomic_file


def _remote_point(task: dict) -> dict:
    """On a worker: the folders the driver named may not exist on this node."""
    from .sweep import run_point

    Path(task["output"]).parent.mkdir(parents=True, exist_ok=True)
    return run_point(task)


def export_result(task: dict, result: dict, results_dir: Path) -> Path:
    """<results_dir>/<point>.json: what a point produced, readable without MLflow (a sweep resumes from it and
    compare rebuilds runs.csv from it): point, status, run_id, duration_s, error, params_hash, parameters, axes,
    where (host, device, git sha of the machine that ran it), tags, params and metrics of the child run (from
    MLflow when tracked). Written to a temporary file, then moved into place."""
    from .sweep import slug
    from .tracking import find_runs

    run = None
    if result.get("run_id") and task.get("track", True):
        try:
            found = find_runs(task["experiment"], f"attributes.run_id = '{result['run_id']}'",
                              tracking_uri=task["tracking_uri"])
        except Exception as exc:  # noqa: BLE001 - the export still records status, parameters and where
            print(f"[hylo_lab] could not read run {result['run_id']} back from MLflow: {exc}", file=sys.stderr)
            found = []
        run = found[0] if found else None
    if run is None:
        run = _files_of(task.get("parameters", {}).get("out_dir"))
    tags = {**task.get("tags", {}), **{k: v for k, v in (run or {}).get("tags", {}).items()
                                        if not k.startswith("mlflow.")}}
    if result.get("duration_s") is not None:
        tags.setdefault("duration_s", f"{result['duration_s']:.1f}")
    data = dict(point=task["key"], status=result["status"], run_id=result.get("run_id"),
                duration_s=result.get("duration_s"), error=result.get("error", ""),
                params_hash=task.get("tags", {}).get("params_hash"), parameters=task.get("parameters", {}),
                axes=json.loads(task.get("tags", {}).get("sweep_point", "{}")), where=result.get("where", {}),
                tags=tags, params=(run or {}).get("params", {}), metrics=(run or {}).get("metrics", {}))
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{slug(task['key'])}.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))
    return path


def _files_of(out_dir) -> dict | None:
    """An untracked point's metrics and summary from the files its notebook left in `out_dir` (metrics.json:
    name -> value as it would have logged them; summary.json: scalars, exported as summary.<name> tags), or None."""
    if not out_dir:
        return None
    found = {}
    for name in ("metrics.json", "summary.json"):
        try:
            found[name] = json.loads((Path(out_dir) / name).read_text())
        except (OSError, ValueError):
            found[name] = {}
    if not found["metrics.json"]:
        return None
    summary = {f"summary.{k}": str(v) for k, v in found["summary.json"].items() if not isinstance(v, (dict, list))}
    return dict(metrics=found["metrics.json"], tags=summary, params={})


def read_exports(results_dir) -> dict[str, dict]:
    """point key -> the exported JSON of every point in `results_dir` (export_result's files)."""
    out = {}
    for path in sorted(Path(results_dir).glob("*.json")) if Path(results_dir).is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "point" in data:
            out[data["point"]] = data
    return out


def where_it_ran() -> dict:
    """host, device (the GPU's name, else the CPU's) and the git sha (+ "-dirty") of the code that ran
    ($HYLO_LAB_GIT_SHA where the code is a copy without .git)."""
    import platform
    import socket
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        sha = f"{sha}-dirty" if sha and dirty else sha
    except (OSError, subprocess.SubprocessError):
        sha = ""
    device = platform.processor() or platform.machine() or "cpu"
    try:
        import torch

        if torch.cuda.is_available():
            device = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    sha = sha or os.environ.get("HYLO_LAB_GIT_SHA", "")  # a copy of the code without .git (a lent GPU machine)
    return dict(host=socket.gethostname(), device=device, git_sha=sha or "unknown")


def mark_lost(task: dict, reason: str) -> str | None:
    """The child run a dead worker left RUNNING -> FAILED with `reason` as its error; returns its id."""
    if not task.get("track", True) or not task.get("parent_run_id"):
        return None
    from .tracking import Tracker, find_runs

    query = (f"tags.mlflow.parentRunId = '{task['parent_run_id']}' AND tags.point_key = '{task['key']}' "
             f"AND tags.params_hash = '{task['tags']['params_hash']}'")
    run_id = None
    for run in find_runs(task["experiment"], query, tracking_uri=task["tracking_uri"]):
        if run["status"] == "RUNNING":
            child = Tracker(task["experiment"], tracking_uri=task["tracking_uri"], run_id=run["run_id"])
            child.set_tags({"error": reason})
            child.end("FAILED")
            run_id = run_id or run["run_id"]
    return run_id


class RayExecutor:
    """Runs sweep tasks as Ray tasks on the cluster at `address` (None: $RAY_ADDRESS, else a local Ray)."""

    def __init__(self, address: str | None = None, *, gpus_per_point: float = 0.0, cpus_per_point: float = 1.0):
        if not (isinstance(gpus_per_point, (int, float)) and gpus_per_point >= 0):
            raise UserError(f"--gpus-per-point {gpus_per_point!r}: give a number >= 0 (0.25 = four points per GPU)")
        if not (isinstance(cpus_per_point, (int, float)) and cpus_per_point > 0):
            raise UserError(f"--cpus-per-point {cpus_per_point!r}: give a number > 0")
        self.address, self.gpus, self.cpus = address, float(gpus_per_point), float(cpus_per_point)

    def connect(self):
        try:
            import ray
        except ImportError:
            raise UserError("--executor ray needs ray: pip install 'hylo_lab[ray]'") from None
        address = self.address or os.environ.get("RAY_ADDRESS") or None
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"--executor ray: cannot connect to a Ray cluster at {address or 'a new local one'} "
                            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); start one with "
                            f"`ray start --head` or give --address HOST:PORT") from None
        return ray

    def __call__(self, tasks: list[dict], jobs: int = 1):
        if not tasks:
            return
        uri = tasks[0]["tracking_uri"]
        if tasks[0].get("track", True) and not uri.startswith(("http://", "https://")):
            print(f"[hylo_lab] --executor ray with tracking URI {uri}: only workers on this machine can reach it; "
                  f"start `mlflow server` and pass --tracking-uri http://HOST:PORT for other nodes", file=sys.stderr)
        ray = self.connect()
        remote = ray.remote(_remote_point).options(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0,
                                                   retry_exceptions=False)
        pending = {remote.remote(task): (task, time.perf_counter()) for task in tasks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                task, t0 = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except Exception as exc:  # noqa: BLE001 - worker died, node lost, task raised outside the notebook
                    reason = f"worker lost: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                    run_id = mark_lost(task, reason)
                    result = dict(key=task["key"], run_id=run_id, status="FAILED",
                                  duration_s=time.perf_counter() - t0, error=reason)
                yield result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            ray.shutdown()
