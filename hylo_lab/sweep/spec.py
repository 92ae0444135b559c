"""A sweep file, read and checked: the notebook's declared parameters, the grid, include points and seeds, dotted
recipe keys, metrics and plots (the package docstring has the format). Nothing here runs a notebook."""

from __future__ import annotations

import ast
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError, read_yaml_mapping


TOP_LEVEL_KEYS = ("name", "notebook", "experiment", "description", "paper_finding", "fixed", "grid", "include",
                  "seeds", "metrics", "plots")
REQUIRED_KEYS = ("name", "notebook", "experiment")
INJECTED = ("run_id", "parent_run_id", "experiment", "tracking_uri")
PLOT_KEYS = ("x", "y", "hue", "style", "kind", "where", "title", "name")
PLOT_KINDS = ("line", "point", "bar", "box", "scatter")
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
METRIC_PATTERN = re.compile(r"([^{}]*)\{(\w+)\}([^{}]*)")  # "eval/niah/{length}" -> prefix, variable, suffix


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
            from ..distill.stages import format_overrides

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
    path = Path(path)
    spec = read_yaml_mapping(path, "sweep file", SweepError, TOP_LEVEL_KEYS)

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


def check_recipe_fields(sweep: Sweep, points: list[dict]) -> None:
    """Each point's recipe fields checked as its notebook checks them, before anything runs: a notebook declaring
    `overrides` is the quickstart's kind (`DemoSettings`: recipes/demo.yaml, the overrides applied, the recipe
    checker run; no weights load), so a typo in a dotted key is named with its point. SweepError lists them."""
    if OVERRIDES not in sweep.declared:
        return
    from ..demo.settings import DemoSettings

    fields = DemoSettings.__dataclass_fields__
    problems = []
    for point in points:
        try:
            DemoSettings(**{k: v for k, v in sweep.parameters(point).items() if k in fields})
        except UserError as exc:
            problems.append(f"{point_key(point)}: {exc}")
    if problems:
        raise SweepError(f"{sweep.path}: {len(problems)} point{'s' if len(problems) > 1 else ''} the notebook would "
                         f"refuse:\n  - " + "\n  - ".join(problems))


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
        pattern = METRIC_PATTERN.fullmatch(y)
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
    from ..config import parse_list

    if text is None:
        return None
    try:
        seeds = parse_list(text, int)
    except ValueError:
        raise SweepError(f"--seeds {text!r}: expected comma-separated integers like 0,1,2") from None
    if not seeds or len(set(seeds)) < len(seeds):
        raise SweepError(f"--seeds {text!r}: give distinct integers like 0,1,2")
    return seeds
