"""The sweep's runs as tables: its parent and child runs in MLflow, exported points in the same form, one row per
point (runs_frame), metric globs expanded in natural order."""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path


def find_parent(name: str, experiment: str | None, tracking_uri: str) -> dict | None:
    """The sweep's parent run (the newest, if a name was reused), found by its `sweep_name` tag."""
    from ..tracking import find_runs

    query = f"tags.sweep_name = '{name}' AND tags.sweep_role = 'parent'"
    runs = find_runs(experiment, query, tracking_uri=tracking_uri)
    return runs[0] if runs else None


def child_runs(parent_run_id: str, experiment: str | None, tracking_uri: str) -> list[dict]:
    from ..tracking import find_runs

    return find_runs(experiment, f"tags.mlflow.parentRunId = '{parent_run_id}'", tracking_uri=tracking_uri)


def display_path(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def natural_key(name: str) -> list:
    """eval/niah/256 before eval/niah/1024."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def expand_metrics(patterns: list[str], available) -> list[str]:
    """Metric names in `patterns` order: plain names as they are, fnmatch globs expanded over `available`."""
    out = []
    for p in patterns:
        matches = sorted((m for m in available if fnmatch.fnmatchcase(m, p)), key=natural_key) if any(
            c in p for c in "*?[") else [p]
        out += [m for m in matches if m not in out]
    return out


def runs_frame(runs: list[dict], axes: list[str], metrics: list[str] | None = None, *, newest_first: bool = True):
    """Child runs -> one row per point (its newest run): point, axis values (typed, from the `sweep_point` tag),
    status, duration_s, run_id, then metrics (all of them, or `metrics` expanded; missing ones NaN). Rows come
    oldest first (the order the points ran in) for runs given newest first, as find_runs returns them."""
    import pandas as pd

    latest = {}
    for run in runs:
        latest.setdefault(run["tags"].get("point_key", run["run_id"]), run)
    available = sorted({m for r in latest.values() for m in r["metrics"]}, key=natural_key)
    names = expand_metrics(metrics, available) if metrics else available
    rows = []
    for key, run in (reversed(latest.items()) if newest_first else latest.items()):
        point = json.loads(run["tags"].get("sweep_point", "{}"))
        duration = run["tags"].get("duration_s")
        rows.append(dict(point=key, **{a: point.get(a) for a in axes}, status=run["status"],
                         duration_s=float(duration) if duration else float("nan"), run_id=run["run_id"],
                         **{m: run["metrics"].get(m, float("nan")) for m in names}))
    return pd.DataFrame(rows, columns=["point", *axes, "status", "duration_s", "run_id", *names])


def export_as_run(data: dict) -> dict:
    """An exported point (executors.export_result) in find_runs' form, for runs_frame."""
    tags = dict(data.get("tags") or {}, point_key=data["point"])
    tags.setdefault("sweep_point", json.dumps(data.get("axes") or {}))
    return dict(run_id=data.get("run_id"), status=data.get("status", "FAILED"), tags=tags,
                metrics=data.get("metrics") or {}, params=data.get("params") or {})
