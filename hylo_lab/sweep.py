"""Papermill sweeps: a YAML file names a notebook, fixed parameters and a grid; every grid point executes the
notebook once as a child MLflow run under one parent run per sweep.

    name: yarn                                # the sweep's identity: a re-run finds its parent run by this
    notebook: notebooks/00_quickstart.ipynb   # relative to the YAML's folder, else to the project root
    experiment: ablations                     # MLflow experiment of the parent and its children
    description: ...                          # optional free text (and paper_finding: ...)
    fixed: {quick: false, yarn_eval: fixed}   # every point gets these
    grid: {stages.kd-long.yarn.factor: [2.0, 4.0]}    # the full product of these lists
    include: [{stages.kd-long.seq_len: 1024}]         # optional extra points, not crossed with the grid
    seeds: [0, 1]                             # optional: one more grid axis, `seed`
    metrics: [eval/niah/256, eval/niah/512]   # shown by the summary and compare (fnmatch globs allowed)
    plots: [{x: length, y: "eval/niah/{length}", hue: stages.kd-long.yarn.factor, kind: line}]   # see compare

Every fixed, grid and include parameter must be declared in the notebook's `parameters` cell, with a value
of the declared type, or be a dotted key: a field of the notebook's recipe, passed to it joined into its
`overrides` parameter ("stages.kd-long.seq_len=1024; ...", read by distill.stages.parse_overrides) and checked
there by the recipe checker. The sweep sets `run_id`, `parent_run_id`, `experiment` and `tracking_uri` itself (the
notebook must declare them) so the notebook's own Tracker logs into the child run the sweep created; a
notebook declaring `out_dir` gets a folder per point unless the sweep sets it. A point is identified by its
`point_key` ("yarn_factor=2.0;seed=0") and a hash of its parameters: a re-run skips points whose run
FINISHED with the same parameters, and runs the rest (failed, killed, new or changed) in new child runs.

Seeds: `seeds` crosses every point with `seed` (the notebook's student seed: init, data order, evaluation
samples; what the seed does not change, such as the quickstart's `world_seed` world and teachers, is shared);
`hylo-lab sweep FILE --seeds 0,1,2` replaces the file's list. A point x seed is one child run tagged `seed`.
Each point's result is also exported to `results/<name>/points/<point>.json` beside the YAML
(executors.export_result: parameters, metrics, where it ran): a re-run skips points whose exported file
FINISHED with the same parameters too, so a sweep resumes on another machine from the committed exports, and
compare rebuilds runs.csv from them without MLflow. The parent run logs the aggregates over seeds
(compare.aggregate: mean, 95% CI, n per point and metric) as tables/aggregates.csv.
"""

from __future__ import annotations

from hylo_lab.errors import UserError
import ast
import difflib
import fnmatch
import hashlib
import itertools
import json
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

TOP_LEVEL_KEYS = ("name", "notebook", "experiment", "description", "paper_finding", "fixed", "grid", "include",
                  "seeds", "metrics", "plots")
REQUIRED_KEYS = ("name", "notebook", "experiment")
INJECTED = ("run_id", "parent_run_id", "experiment", "tracking_uri")
PLOT_KEYS = ("x", "y", "hue", "style", "kind", "where", "title", "name")
PLOT_KINDS = ("line", "point", "bar", "box", "scatter")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_PATTERN = re.compile(r"([^{}]*)\{(\w+)\}([^{}]*)")  # "eval/niah/{length}" -> prefix, variable, suffix
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


OVERRIDES = "overrides"  # the notebook parameter that receives dotted keys: "stages.kd-long.steps=300; ..."


def is_override(key: str, declared: dict) -> bool:
    """A key the notebook does not declare, when it declares `overrides`, names a recipe field (`teacher`,
    `stages.kd-long.seq_len`): it is passed in `overrides`; without that parameter only dotted keys are."""
    return key not in declared and (OVERRIDES in declared or "." in str(key))


class SweepError(UserError):
    """A sweep file that cannot run; the message lists every problem found."""


@dataclass(frozen=True)
class Param:
    name: str
    type: type | None  # None: no plain type could be read, so values are not checked
    default: object


def notebook_parameters(notebook) -> dict[str, Param]:
    """The assignments in the notebook's cell tagged `parameters` (`name: type = default  # help` or
    `name = default`), read with ast: nothing is executed. The type is the annotation when it is int, float,
    str or bool, else the default's type."""
    import nbformat

    nb = nbformat.read(str(notebook), as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    if not cells:
        raise SweepError(f"{notebook}: no code cell is tagged `parameters`")
    try:
        tree = ast.parse(cells[0].source)
    except SyntaxError as e:
        raise SweepError(f"{notebook}: the parameters cell does not parse: {e}") from None
    out = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            name, annotation, value = stmt.target.id, ast.unparse(stmt.annotation), stmt.value
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            name, annotation, value = stmt.targets[0].id, None, stmt.value
        else:
            continue
        try:
            default = ast.literal_eval(value) if value is not None else None
        except ValueError:
            default = None
        typ = _TYPES.get(annotation) or (type(default) if type(default) in _TYPES.values() else None)
        out[name] = Param(name, typ, default)
    return out


def _check_type(value, param: Param):
    """The value as the notebook will get it (an int for a float parameter becomes a float), or a message."""
    typ = param.type
    if typ is None:
        return value, None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), None
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value, None
    return value, f"{value!r} is a {type(value).__name__} but the notebook declares {param.name}: {typ.__name__}"


def _suggest(name, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def point_key(point: dict) -> str:
    return ";".join(f"{k}={v}" for k, v in point.items())


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Sweep:
    name: str
    path: Path
    notebook: Path
    experiment: str
    fixed: dict
    grid: dict
    include: list = field(default_factory=list)
    seeds: list = field(default_factory=list)
    metrics: list = field(default_factory=list)
    plots: list = field(default_factory=list)
    description: str = ""
    paper_finding: str = ""
    declared: dict = field(default_factory=dict)

    @property
    def axes(self) -> list[str]:
        """The columns that tell points apart: grid keys, keys only extra points set, then seed."""
        axes = list(dict.fromkeys([*self.grid, *(k for p in self.include for k in p)]))
        return axes + (["seed"] if self.seeds else [])

    def points(self) -> list[dict]:
        """Grid product then extra points, each crossed with the seeds; keys in `axes` order, duplicates dropped."""
        grid = [dict(zip(self.grid, values)) for values in itertools.product(*self.grid.values())] if self.grid else []
        points = grid + [dict(p) for p in self.include]
        if self.seeds:
            points = [{**p, "seed": s} for p in points for s in self.seeds]
        unique = {}
        for p in points:
            ordered = {k: p[k] for k in self.axes if k in p}
            unique.setdefault(point_key(ordered), ordered)
        return list(unique.values())

    def values(self, point: dict) -> dict:
        """Fixed values and the point's, dotted recipe keys still apart."""
        return {**self.fixed, **point}

    def parameters(self, point: dict) -> dict:
        """What the notebook gets for a point, before the sweep adds run ids and out_dir: dotted keys
        (recipe fields, `stages.kd-long.steps`) joined into its `overrides` parameter after any given there."""
        values = self.values(point)
        dotted = {k: values.pop(k) for k in list(values) if is_override(k, self.declared)}
        if dotted:
            from .distill.stages import format_overrides

            values[OVERRIDES] = "; ".join(x for x in (values.get(OVERRIDES, ""), format_overrides(dotted)) if x)
        return values

    def axis_values(self, point: dict) -> dict:
        """Every axis's effective value at a point: the point's, else fixed, else the notebook's default."""
        params = self.values(point)
        return {a: params[a] if a in params else getattr(self.declared.get(a), "default", None) for a in self.axes}

    def select(self, only: dict | None) -> list[dict]:
        """The points whose effective value (point, fixed, else notebook default) of each `only` key is one
        of the given values; values given as strings (from the command line) are read as the declared type."""
        if not only:
            return self.points()
        wanted = {}
        for key, values in only.items():
            if is_override(key, self.declared) and OVERRIDES in self.declared:
                import yaml

                values = values if isinstance(values, (list, tuple, set)) else [values]
                wanted[key] = {json.dumps(yaml.safe_load(v) if isinstance(v, str) else v) for v in values}
                continue
            if key not in self.declared:
                raise SweepError(f"--only {key}: not a parameter of {self.notebook.name}{_suggest(key, self.declared)}")
            values = values if isinstance(values, (list, tuple, set)) else [values]
            wanted[key] = {_parse_value(v, self.declared[key]) for v in values}
        chosen = []
        for p in self.points():
            params = self.values(p)
            if all((json.dumps(params.get(k)) if is_override(k, self.declared) else params.get(k, self.declared[k].default)) in vals
                   for k, vals in wanted.items()):
                chosen.append(p)
        if not chosen:
            raise SweepError(f"--only {only} matches none of the {len(self.points())} points of sweep {self.name!r}")
        return chosen

    @property
    def points_dir(self) -> Path:
        """Where each point's result is exported: results/<name>/points/ beside the YAML."""
        return self.path.parent / "results" / self.name / "points"

    def spec(self) -> dict:
        """What compare needs to rebuild the plots from MLflow alone (stored as the parent's `sweep_spec` tag)."""
        return dict(name=self.name, experiment=self.experiment, axes=self.axes, metrics=self.metrics, plots=self.plots)


def _parse_value(value, param: Param):
    if not isinstance(value, str) or param.type in (None, str):
        return value
    if param.type is bool:
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise SweepError(f"--only {param.name}={value}: expected true or false")
    try:
        return param.type(value)
    except ValueError:
        raise SweepError(f"--only {param.name}={value}: expected a {param.type.__name__}") from None


def _resolve_notebook(sweep_file: Path, notebook: str) -> tuple[Path, list[Path]]:
    nb = Path(notebook)
    if nb.is_absolute():
        return nb, [nb]
    roots = [d for d in sweep_file.resolve().parents if (d / "pyproject.toml").exists()][:1]
    candidates = [sweep_file.parent / nb] + [r / nb for r in roots] + [Path.cwd() / nb]
    candidates = list(dict.fromkeys(c.resolve() for c in candidates))
    found = next((c for c in candidates if c.exists()), candidates[min(1, len(candidates) - 1)])
    return found.resolve(), candidates


def load_sweep(path, *, declared: dict[str, Param] | None = None, seeds: list[int] | None = None) -> Sweep:
    """Read and validate a sweep file; raises SweepError listing every problem. `declared` stands in for the
    notebook's parameters (tests of sweep files whose notebook is not written yet); `seeds` replaces the file's
    `seeds` (the command line's --seeds)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: no such sweep file")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"{path}: a sweep file is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}")

    problems = []
    for key in spec:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"unknown key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}; allowed: {', '.join(TOP_LEVEL_KEYS)}")
    problems += [f"missing required key {key!r}" for key in REQUIRED_KEYS if key not in spec]

    name = spec.get("name", "")
    if "name" in spec and not (isinstance(name, str) and _SAFE_NAME.fullmatch(name)):
        problems.append(f"name {name!r} must be letters, digits, '_', '.' or '-'")
    experiment = spec.get("experiment", "")
    if "experiment" in spec and not (isinstance(experiment, str) and experiment.strip()):
        problems.append("experiment must be a non-empty string (the MLflow experiment name)")

    notebook = Path()
    if isinstance(spec.get("notebook"), str):
        notebook, candidates = _resolve_notebook(path, spec["notebook"])
        if not notebook.is_file() and declared is None:
            looked = ", ".join(str(c) for c in candidates)
            problems.append(f"notebook {spec['notebook']!r} not found (looked in {looked})")
        elif declared is None:
            try:
                declared = notebook_parameters(notebook)
            except SweepError as e:
                problems.append(str(e))
    elif "notebook" in spec:
        problems.append("notebook must be a path to an .ipynb file")

    def mapping(key):
        value = spec.get(key) or {}
        if not isinstance(value, dict):
            problems.append(f"{key} must be a mapping of parameter -> value, got {type(value).__name__}")
            return {}
        return dict(value)

    fixed, grid = mapping("fixed"), mapping("grid")
    if "grid" not in spec and not spec.get("include"):
        problems.append("missing required key 'grid' (or `include`: a list of points)")
    elif "grid" in spec and not grid and not spec.get("include"):
        problems.append("grid is empty: a sweep needs at least one parameter with a list of values")
    for key, values in list(grid.items()):
        if not isinstance(values, list) or not values:
            problems.append(f"grid.{key} must be a non-empty list of values"
                            + ("; put a single value under fixed" if not isinstance(values, list) else ""))
            grid.pop(key)
        elif len({json.dumps(v, default=str) for v in values}) < len(values):
            problems.append(f"grid.{key} lists a value twice: {values}")
    for key in fixed.keys() & grid.keys():
        problems.append(f"{key!r} is both fixed and a grid axis")

    include = spec.get("include") or []
    if not isinstance(include, list) or not all(isinstance(p, dict) and p for p in include):
        problems.append("include must be a list of non-empty mappings, each one extra point")
        include = []

    given_seeds = seeds
    seeds = list(given_seeds) if given_seeds is not None else (spec.get("seeds") or [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        where = "--seeds" if given_seeds is not None else "seeds"
        problems.append(f"{where} must be a list of integers, got {seeds!r}")
        seeds = []
    if seeds and ("seed" in grid or "seed" in fixed or any("seed" in p for p in include)):
        problems.append("seed is set by `seeds`: remove it from fixed, grid and include")

    metrics = spec.get("metrics") or []
    if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
        problems.append("metrics must be a list of metric names")
        metrics = []

    if declared is not None:
        nb_name = Path(spec.get("notebook", "the notebook")).name
        missing = [k for k in INJECTED if k not in declared]
        if missing:
            problems.append(f"{nb_name} must declare {', '.join(INJECTED)} in its parameters cell so its Tracker logs "
                            f"into the sweep's child run (missing: {', '.join(missing)})")
        if seeds and "seed" not in declared:
            problems.append(f"seeds are given but {nb_name} declares no `seed` parameter")

        def check(where, key, value):
            if is_override(key, declared) and OVERRIDES in declared:
                return value  # a recipe field: the notebook's recipe checker validates it
            if is_override(key, declared):
                problems.append(f"{where}.{key}: a dotted key needs an `{OVERRIDES}` parameter in {nb_name}")
            elif key in INJECTED:
                problems.append(f"{where}.{key}: set by the sweep itself, remove it")
            elif key not in declared:
                problems.append(f"{where}.{key}: not a parameter of {nb_name}{_suggest(key, declared)}; "
                                f"it declares {', '.join(k for k in declared if k not in INJECTED)}")
            else:
                value, error = _check_type(value, declared[key])
                if error:
                    problems.append(f"{where}.{key}: {error}")
            return value

        fixed = {k: check("fixed", k, v) for k, v in fixed.items()}
        grid = {k: [check("grid", k, v) for v in vs] for k, vs in grid.items()}
        include = [{k: check(f"include[{i}]", k, v) for k, v in p.items()} for i, p in enumerate(include)]

    sweep = Sweep(name=name, path=path, notebook=notebook, experiment=experiment, fixed=fixed, grid=grid,
                  include=include, seeds=seeds, metrics=metrics, plots=[], declared=declared or {},
                  description=str(spec.get("description") or ""), paper_finding=str(spec.get("paper_finding") or ""))
    sweep.plots = _check_plots(spec.get("plots") or [], sweep.axes, problems)
    if problems:
        raise SweepError(f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''}:\n  - "
                         + "\n  - ".join(problems))
    return sweep


def _yaml_problem(exc) -> str:
    """A YAML parse error in one line: "line 2, column 7: expected ',' or ']', but got ':'"."""
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(exc, "problem", None) or exc).split())


def _check_plots(plots, axes, problems) -> list[dict]:
    if not isinstance(plots, list) or not all(isinstance(p, dict) for p in plots):
        problems.append("plots must be a list of mappings like {x: length, y: 'eval/niah/{length}', hue: layout}")
        return []
    out = []
    for i, plot in enumerate(plots):
        where = f"plots[{i}]"
        for key in plot:
            if key not in PLOT_KEYS:
                problems.append(f"{where}: unknown key {key!r}{_suggest(key, PLOT_KEYS)}; "
                                f"allowed: {', '.join(PLOT_KEYS)}")
        if "x" not in plot or "y" not in plot:
            problems.append(f"{where}: x and y are required")
            continue
        y = str(plot["y"])
        pattern = _PATTERN.fullmatch(y)
        if "{" in y and not pattern:
            problems.append(f"{where}: y {y!r} may hold one {{placeholder}}, like 'eval/niah/{{length}}'")
        columns = set(axes) | {"point", "status"} | ({pattern.group(2)} if pattern else set())
        for key in ("x", "hue", "style"):
            if key in plot and plot[key] not in columns:
                problems.append(f"{where}: {key}={plot[key]!r} is not a column of the sweep's table; use one of "
                                f"{', '.join(sorted(columns))}")
        where_ = plot.get("where") or {}
        if not isinstance(where_, dict):
            problems.append(f"{where}: where must be a mapping of column -> value (or list of values)")
        for key in where_ if isinstance(where_, dict) else []:
            if key not in columns:
                problems.append(f"{where}: where.{key} is not a column of the sweep's table")
        kind = plot.get("kind", "line")
        if kind not in PLOT_KINDS:
            problems.append(f"{where}: kind {kind!r} is not one of {', '.join(PLOT_KINDS)}")
        out.append({**plot, "kind": kind})
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)[:150] or "point"


def _describe(exc) -> str:
    """A notebook's own traceback for a cell that raised (papermill), else this process's."""
    if hasattr(exc, "ename") and hasattr(exc, "traceback"):
        return _ANSI.sub("", f"{exc.ename}: {exc.evalue}\n\n" + "\n".join(exc.traceback))
    return "".join(traceback.format_exception(exc))


def _run_point(task: dict) -> dict:
    """One point, in this process or a pool worker: create the child run, execute the notebook into it with
    papermill, keep the executed notebook (and a traceback if it failed), set the run's final status."""
    import logging

    import papermill

    from .tracking import Tracker

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
    from .executors import where_it_ran

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


def find_parent(name: str, experiment: str | None, tracking_uri: str) -> dict | None:
    """The sweep's parent run (the newest, if a name was reused), found by its `sweep_name` tag."""
    from .tracking import find_runs

    query = f"tags.sweep_name = '{name}' AND tags.sweep_role = 'parent'"
    runs = find_runs(experiment, query, tracking_uri=tracking_uri)
    return runs[0] if runs else None


def child_runs(parent_run_id: str, experiment: str | None, tracking_uri: str) -> list[dict]:
    from .tracking import find_runs

    return find_runs(experiment, f"tags.mlflow.parentRunId = '{parent_run_id}'", tracking_uri=tracking_uri)


def _open_parent(sweep: Sweep, uri: str):
    from .tracking import Tracker

    tags = dict(sweep_name=sweep.name, sweep_role="parent", notebook=_display_path(sweep.notebook),
                sweep_file=_display_path(sweep.path), sweep_spec=json.dumps(sweep.spec()))
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


def _display_path(path: Path) -> str:
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

    from .outputs import check_writable, locked
    from .tracking import default_tracking_uri, store_problem

    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SweepError(f"--jobs {jobs!r}: give a positive number of parallel points")
    sweep = load_sweep(path, seeds=seeds)
    points = sweep.select(only)
    points_dir = Path(points_dir or sweep.points_dir).resolve()
    uri = tracking_uri or default_tracking_uri()
    out_dir = Path(out_dir or Path("runs") / "sweeps" / sweep.name).resolve()
    axes = sweep.axes

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
            print(f"[hylo_lab] MLflow unavailable, the sweep runs without tracking (no finished point can be "
                  f"skipped, no metrics in the summary): {problem}", file=sys.stderr)
        parent = None if problem else _open_parent(sweep, uri)
        return _run_points(sweep, points, parent, uri, out_dir, jobs, kernel_name, echo, executor, points_dir)


def _export_as_run(data: dict) -> dict:
    """An exported point (executors.export_result) in find_runs' form, for runs_frame."""
    tags = dict(data.get("tags") or {}, point_key=data["point"])
    tags.setdefault("sweep_point", json.dumps(data.get("axes") or {}))
    return dict(run_id=data.get("run_id"), status=data.get("status", "FAILED"), tags=tags,
                metrics=data.get("metrics") or {}, params=data.get("params") or {})


def _run_points(sweep: Sweep, points: list[dict], parent, uri: str, out_dir: Path, jobs: int, kernel_name, echo,
                executor=None, points_dir: Path | None = None):
    """run_sweep's work once the folder is locked; `parent` None: MLflow is unavailable, nothing is tracked."""
    import pandas as pd

    axes = sweep.axes
    finished = {}
    for run in child_runs(parent.run_id, sweep.experiment, uri) if parent else []:
        if run["status"] == "FINISHED":
            finished.setdefault((run["tags"].get("point_key"), run["tags"].get("params_hash")), run)

    from .executors import export_result, read_exports

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
            from_exports[key] = _export_as_run(done)
            continue
        if "out_dir" in sweep.declared and "out_dir" not in params:
            params["out_dir"] = str(out_dir / _slug(key))
        shown = sweep.axis_values(p)
        tags = dict(sweep_name=sweep.name, point_key=key, params_hash=digest, sweep_point=json.dumps(shown),
                    notebook=_display_path(sweep.notebook), **{k: str(v) for k, v in shown.items()})
        tasks.append(dict(key=key, parameters=params, tags=tags, experiment=sweep.experiment, tracking_uri=uri,
                          parent_run_id=parent.run_id if parent else "", track=parent is not None,
                          notebook=str(sweep.notebook),
                          output=str(out_dir / f"{_slug(key)}.ipynb"), kernel_name=kernel_name, cwd=None))

    echo(f"sweep {sweep.name!r}: {len(points)} point(s), {len(skipped)} already finished, running {len(tasks)} "
         f"with {min(jobs, max(len(tasks), 1))} job(s); "
         + (f"parent run {parent.run_id} in experiment {sweep.experiment!r} at {uri}" if parent else "not tracked"))
    results = {}
    by_key = {t["key"]: t for t in tasks}
    try:
        for i, result in enumerate((executor or _execute)(tasks, jobs), 1):  # executor: executors.RayExecutor
            results[result["key"]] = result
            export_result(by_key[result["key"]], result, points_dir)
            note = f"  ({result['error']})" if result["error"] else ""
            echo(f"[{i}/{len(tasks)}] {result['key']}: {result['status']} in {result['duration_s']:.1f} s{note}")
    except KeyboardInterrupt:
        if parent:
            parent.end("KILLED")
        raise
    if parent is None:
        rows = []
        for p in points:
            key = point_key(p)
            run = from_exports.get(key) or dict(run_id=None, status=results[key]["status"], metrics={},
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
    from .compare import aggregate

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
            yield _run_point(task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(min(jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_point, task): task for task in tasks}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as exc:  # the worker itself died; the point's run (if any) stays RUNNING
                yield dict(key=futures[future]["key"], run_id=None, status="FAILED", duration_s=0.0,
                           error=f"worker failed: {type(exc).__name__}: {exc}")


def parse_only(items: list[str] | None) -> dict:
    """["layout=2MLA2GDN", "layout=3MLA1GDN", "seed=0"] -> {"layout": [...], "seed": ["0"]}."""
    only = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"--only expects KEY=VALUE, got {item!r}")
        only.setdefault(key.strip(), []).append(value.strip())
    return only



def parse_seeds(text: str | None) -> list[int] | None:
    """"0,1,2" -> [0, 1, 2]; None -> None (the YAML's seeds)."""
    from .config import parse_list

    if text is None:
        return None
    try:
        seeds = parse_list(text, int)
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected comma-separated integers like 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise SweepError(f"--seeds {text!r}: give distinct integers like 0,1,2")
    return seeds
