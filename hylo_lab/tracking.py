"""MLflow logging behind one small object: the only module that imports mlflow.

Conventions (architecture.md): one run per execution; params = the flattened config, logged once; metric names
`split/name[/sub]`; artifacts under `notebook/`, `figures/`, `tables/`; single values of a run as `summary.*` tags
plus a table (`log_summary`), not one-point metrics; experiments tagged as model development (`ensure_experiment`)
so MLflow's UI opens on the runs table. MLflow being unreachable or failing is
reported once on stderr and the run goes on without logging: losing a metric must never lose the training.
`store_problem` finds an unreachable server or an unwritable store within seconds, before MLflow's own retries
(minutes) start.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-./ :]")
_PROBED: dict[str, str | None] = {}  # uri -> the problem found (None: usable), probed once per process
_REPORTED: set[str] = set()  # uris whose problem was already printed


class TrackingUnavailable(RuntimeError):
    """A reader (find_runs) cannot reach the MLflow store: the message says which store and why."""


def _writable_folder(folder: Path) -> str | None:
    """None when a file can be created in `folder` or, if it does not exist yet, in its nearest existing parent."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def store_problem(uri: str, timeout: float = 3.0) -> str | None:
    """Why the MLflow store at `uri` cannot be used, or None. Checked once per process and uri, in at most about
    `timeout` seconds: http(s) -> the server answers at all (any HTTP status counts); sqlite:///path -> the file, or
    the folder that will hold it, can be written; file:// or a plain path -> its folder can be written. Other
    schemes (databricks, ...) are left to MLflow."""
    if uri in _PROBED:
        return _PROBED[uri]
    problem = None
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
        except urllib.error.HTTPError:
            pass
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            problem = f"the MLflow server at {uri} does not answer ({reason})"
    elif uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?")[0]
        if path and path != ":memory:":
            path = Path(path)
            if path.is_dir():
                problem = f"{path} is a folder, not a database file"
            elif path.exists() and not os.access(path, os.W_OK):
                problem = f"{path} is read-only"
            else:
                problem = _writable_folder(path.parent)
    elif uri.startswith("file:") or "://" not in uri:
        from urllib.parse import urlparse

        problem = _writable_folder(Path(urlparse(uri).path if uri.startswith("file:") else uri))
    _PROBED[uri] = problem
    return problem


@contextmanager
def store_creation(uri: str):
    """Holds the block (a process's first access to the store, which creates a new sqlite database's tables) while
    no other process does the same for the database's folder: two processes migrating one new database at once
    collide ("table _alembic_tmp_experiments already exists") and one of them loses its logging. Blocks, unlike
    outputs.locked; a lock on the folder itself, so no file is left beside the database. Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks
        yield
        return
    folder = Path(uri[len("sqlite:///"):].split("?")[0]).absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [1, 2]} -> {"a.b": 1, "c": "[1, 2]"}: plain values MLflow params accept."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = json.dumps(v) if len(json.dumps(v)) < 500 else json.dumps(v)[:497] + "..."
        else:
            out[key] = v
    return out


def metric_name(name: str) -> str:
    return _BAD_CHARS.sub("_", name)


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


class Tracker:
    """Wraps one MLflow run. `Tracker(enabled=False)` (or a failure to reach MLflow) logs nothing."""

    def __init__(self, experiment: str = "hylo_lab", run_name: str | None = None, *, tracking_uri: str | None = None,
                 tags: dict | None = None, parent_run_id: str | None = None, run_id: str | None = None,
                 enabled: bool = True):
        self.run_id = None
        self._mlflow = None
        self.tracking_uri = None
        if not enabled:
            return
        uri = self.tracking_uri = tracking_uri or default_tracking_uri()
        try:
            problem = store_problem(uri)
            if problem:
                raise TrackingUnavailable(problem)
            import mlflow

            mlflow.set_tracking_uri(uri)
            with store_creation(uri):
                ensure_experiment(mlflow.MlflowClient(), experiment, artifact_location(uri))
            mlflow.set_experiment(experiment)
            all_tags = {"git_sha": git_sha(), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            client = mlflow.MlflowClient()
            if run_id:
                self.run_id = run_id
            else:
                exp = client.get_experiment_by_name(experiment)
                run = client.create_run(exp.experiment_id, tags={k: str(v) for k, v in all_tags.items()}, run_name=run_name)
                self.run_id = run.info.run_id
            self._client, self._mlflow = client, mlflow
        except Exception as exc:  # unreachable server, bad URI, missing package
            self._report(exc, uri)

    @property
    def active(self) -> bool:
        return self._mlflow is not None

    def _report(self, exc, uri=None):
        """Once per store and process: a warning, and one line on stderr (the CLI silences the warning)."""
        self._mlflow = None
        uri = uri or self.tracking_uri
        if uri in _REPORTED:
            return
        _REPORTED.add(uri)
        what = str(exc) if isinstance(exc, TrackingUnavailable) else f"{type(exc).__name__}: {exc}"
        warnings.warn(f"MLflow logging disabled: {what}", stacklevel=3)
        print(f"[hylo_lab] MLflow unavailable, continuing without logging: {what}", file=sys.stderr)

    def _call(self, method: str, *args, **kwargs):
        """Calls MlflowClient.<method>; a failure is reported once and disables logging."""
        if not self.active:
            return None
        try:
            return getattr(self._client, method)(*args, **kwargs)
        except Exception as exc:
            self._report(exc)

    def log_params(self, params: dict):
        if not self.active:
            return
        from mlflow.entities import Param

        flat = flatten(params)
        batch = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(batch), 100):
            self._call("log_batch", self.run_id, params=batch[i : i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None):
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(metric_name(k), float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and v == v]
        for i in range(0, len(batch), 500):
            self._call("log_batch", self.run_id, metrics=batch[i : i + 500])

    def set_tags(self, tags: dict):
        for k, v in tags.items():
            self._call("set_tag", self.run_id, k, str(v))

    def get_tags(self) -> dict:
        run = self._call("get_run", self.run_id)
        return dict(run.data.tags) if run is not None else {}

    def log_artifact(self, path, artifact_path: str | None = None):
        path = Path(path)
        if path.is_dir():
            self._call("log_artifacts", self.run_id, str(path), artifact_path)
        else:
            self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_figure(self, fig, name: str):
        """Saves a matplotlib figure as figures/<name>.png."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / (name if name.endswith(".png") else name + ".png")
            fig.savefig(path, dpi=120, bbox_inches="tight")
            self.log_artifact(path, "figures")

    def log_dict(self, data, name: str, artifact_path: str = "tables"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2, default=str))
            self.log_artifact(path, artifact_path)

    def log_summary(self, values: dict, name: str = "summary.json"):
        """Single values of the run (goals, ratios, timings): one tag `summary.<key>` each (shown in the runs table's
        columns and the run's overview, never as a one-point chart) and `tables/<name>` holding all of them."""
        flat = {k: v for k, v in flatten(values).items() if v is not None}
        self.set_tags({f"summary.{k}"[:250]: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in flat.items()})
        self.log_dict(values, name)

    def log_curve(self, name: str, values, *, start_step: int = 0):
        """A curve (e.g. a loss per step recorded elsewhere) as the metric `name` with one point per step."""
        if not self.active:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(metric_name(name), float(v), ts, start_step + i) for i, v in enumerate(values) if v == v]
        for i in range(0, len(batch), 1000):
            self._call("log_batch", self.run_id, metrics=batch[i : i + 1000])

    def url(self) -> str:
        """Where the run opens: its page on an http(s) server, else the `mlflow ui` address for a local store."""
        if not self.active:
            return ""
        run = self._call("get_run", self.run_id)
        exp = run.info.experiment_id if run is not None else "0"
        return run_address(exp, self.run_id, self.tracking_uri)

    def end(self, status: str = "FINISHED"):
        self._call("set_terminated", self.run_id, status)

    def set_status(self, status: str):
        """Sets RUNNING / FINISHED / FAILED / KILLED without ending the run (a sweep re-opening its parent)."""
        self._call("update_run", self.run_id, status=status)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.end("FAILED" if exc_type else "FINISHED")
        return False


LOCAL_UI = "http://127.0.0.1:5000"  # `make mlflow-ui`
# Earlier MLflow 3 UIs chose an experiment's view (GenAI traces or model-training runs) from this tag.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow 3.17 ignores the tag: one browser-wide switch (GenAI by default, kept in the browser's local storage once
# toggled in the sidebar) decides, and this query parameter overrides it for the page it opens.
UI_QUERY = "?workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    """The UI's address: the tracking server itself, else the `mlflow ui` address for a local store."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith("http") else LOCAL_UI


def experiment_url(experiment_id: str, tracking_uri: str) -> str:
    """Where an experiment opens on its runs table (not MLflow 3.17's GenAI overview)."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}{UI_QUERY}"


def run_address(experiment_id: str, run_id: str, tracking_uri: str) -> str:
    """Where a run opens: its page on an http(s) server, else the `mlflow ui` address for a local store."""
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}{UI_QUERY}"


def run_url(run_id: str, tracking_uri: str | None = None) -> str:
    """Tracker.url for a run this process holds no Tracker of (a sweep's parent, a distillation's run); "" when
    the store cannot be reached (tracking.store_problem, already reported) or does not hold the run."""
    uri = tracking_uri or default_tracking_uri()
    if not run_id or store_problem(uri):
        return ""
    try:
        import mlflow

        experiment_id = mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:
        return ""
    return run_address(experiment_id, run_id, uri)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local sqlite store keeps its artifacts: `mlruns/` beside the database, whatever
    the working directory (MLflow's default, ./mlruns, would scatter them: notebooks/mlruns from a notebook).
    None for other stores (a server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlruns")


def ensure_experiment(client, name: str, artifacts: str | None = None) -> str:
    """The id of experiment `name`, created if missing (its artifacts under `artifacts` when given); tagged as
    model development so the UI opens on its runs."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        except Exception:  # another process (a parallel sweep point) created it first
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    for k, v in EXPERIMENT_KIND.items():
        if exp.tags.get(k) != v:
            client.set_experiment_tag(exp.experiment_id, k, v)
    return exp.experiment_id


def run_name(what: str, *parts, when: float | None = None) -> str:
    """A run name that says what ran and when: run_name("demo", "2MLA2GDN", "seed0") -> 'demo 2MLA2GDN seed0
    2026-12-06 14:05'."""
    import time

    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
    return " ".join([what, *(str(p) for p in parts if p not in (None, "")), stamp])


def default_tracking_uri() -> str:
    """The one default MLflow store (Tracker, notebooks, sweep, compare, the CLI): $MLFLOW_TRACKING_URI, else
    sqlite mlflow.db in the root of the hylo_lab checkout holding the working directory (what `make mlflow-ui`
    serves, the same from notebooks/ as from the root), else in the working directory. Absolute."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store_folder() / 'mlflow.db'}"


def store_folder() -> Path:
    """The working directory's nearest folder (itself or a parent) holding hylo_lab's pyproject.toml, else itself."""
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and 'name = "hylo_lab"' in pyproject.read_text(errors="replace"):
            return folder
    return cwd


def find_runs(experiment: str | None = None, filter_string: str = "", *, tracking_uri: str | None = None) -> list[dict]:
    """Runs matching an MLflow filter (e.g. "tags.sweep_name = 'yarn'"), newest first, as plain dicts {run_id,
    run_name, experiment, experiment_id, status, start_time, end_time, tags, params, metrics (latest values)}.
    `experiment=None` searches every experiment; an experiment that does not exist has no runs. Unlike
    Tracker, errors are raised (TrackingUnavailable for a store that cannot be reached): a reader has nothing to
    protect."""
    uri = tracking_uri or default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):].split("?")[0]).exists():
        return []  # no database, no runs (and no empty database created by reading)
    problem = store_problem(uri)
    if problem:
        raise TrackingUnavailable(problem)
    import mlflow

    with store_creation(uri):  # a store another process is creating: wait, don't migrate it a second time
        client = mlflow.MlflowClient(tracking_uri=uri)
    if experiment is None:
        experiments, token = [], None
        while True:
            page = client.search_experiments(max_results=1000, page_token=token)
            experiments += page
            token = page.token
            if not token:
                break
    else:
        experiments = [e for e in [client.get_experiment_by_name(experiment)] if e is not None]
    names = {e.experiment_id: e.name for e in experiments}
    if not names:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs(list(names), filter_string, max_results=1000, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    return [dict(run_id=r.info.run_id, run_name=r.info.run_name, experiment=names[r.info.experiment_id],
                 experiment_id=r.info.experiment_id,
                 status=r.info.status, start_time=r.info.start_time, end_time=r.info.end_time, tags=dict(r.data.tags),
                 params=dict(r.data.params), metrics=dict(r.data.metrics)) for r in runs]
