"""Compare a sweep's runs: its child runs from MLflow as one DataFrame, and the plots its YAML asks for.

A plot spec is {x, y, hue, style, kind, where, title, name}; kind is line (default), point, bar, box or
scatter; `where` keeps the rows whose columns have the given values ({layout: 2MLA2GDN} or {layout: [a, b]}).
`y` is a metric name, or a pattern with one placeholder such as "eval/niah/{length}": every metric matching it
becomes a row of a long table whose `length` column holds the matched part (a number where it parses), so
"NIAH accuracy vs length, one line per layout" is {x: length, y: "eval/niah/{length}", hue: layout}. Only
FINISHED runs are plotted; with several seeds per point seaborn draws the mean and its confidence band.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .sweep import _PATTERN, SweepError, child_runs, find_parent, load_sweep, point_key, runs_frame


def sweep_runs(sweep, *, tracking_uri: str | None = None):
    """The sweep (a YAML path or a sweep name) -> (DataFrame of its points' newest runs, spec dict, parent run).
    spec: name, experiment, axes, metrics, plots, and the YAML path when one was given. By name, every point
    the sweep ever ran is listed, in the order they ran."""
    from .tracking import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    is_file = str(sweep).endswith((".yaml", ".yml")) or Path(sweep).is_file()
    if is_file:
        loaded = load_sweep(sweep)
        spec = dict(loaded.spec(), path=str(loaded.path))
        parent = find_parent(loaded.name, loaded.experiment, uri)
    else:
        parent = find_parent(str(sweep), None, uri)
        spec = json.loads(parent["tags"].get("sweep_spec", "{}")) if parent else {}
    if parent is None:
        raise SweepError(f"no sweep named {spec.get('name', sweep)!r} in MLflow at {uri}: run `hylo-lab sweep` first")
    frame = runs_frame(child_runs(parent["run_id"], parent["experiment"], uri), spec.get("axes", []))
    if is_file:  # the file's points in its order, not points since removed from it
        order = {point_key(p): i for i, p in enumerate(loaded.points())}
        frame = frame[frame.point.isin(order)].sort_values("point", key=lambda s: s.map(order)).reset_index(drop=True)
    frame.attrs.update(parent_run_id=parent["run_id"], tracking_uri=uri, sweep=spec.get("name"))
    return frame, spec, parent


def long_form(frame, y: str):
    """(table, y column, x column or None): a pattern y melts its matching metric columns into rows."""
    import pandas as pd

    match = _PATTERN.fullmatch(y)
    if not match:
        return frame, y, None
    prefix, var, suffix = match.groups()
    rx = re.compile(re.escape(prefix) + r"([^/]+)" + re.escape(suffix))
    columns = {c: m.group(1) for c in frame.columns if (m := rx.fullmatch(str(c)))}
    value = (prefix + suffix).strip("/") or y
    if value in frame.columns:
        value += " (value)"
    if not columns:
        return frame.assign(**{var: pd.Series(dtype=float), value: pd.Series(dtype=float)}).iloc[0:0], value, var
    keep = [c for c in frame.columns if c not in columns]
    long = frame.melt(id_vars=keep, value_vars=list(columns), var_name=var, value_name=value)
    long[var] = long[var].map(columns)
    numeric = pd.to_numeric(long[var], errors="coerce")
    if numeric.notna().all():
        long[var] = numeric
    return long, value, var


def plot_sweep(frame, plot: dict, *, title: str | None = None):
    """One figure for one plot spec (see the module docstring), from the rows of `frame` that FINISHED."""
    import seaborn as sns
    from matplotlib.figure import Figure

    data = frame[frame.status == "FINISHED"] if "status" in frame else frame
    for col, wanted in (plot.get("where") or {}).items():
        data = data[data[col].isin(wanted if isinstance(wanted, list) else [wanted])]
    data, y, _ = long_form(data, str(plot["y"]))
    x, hue, style, kind = plot["x"], plot.get("hue"), plot.get("style"), plot.get("kind", "line")
    data = data.dropna(subset=[y])
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.set_title(plot.get("title") or f"{title + ': ' if title else ''}{y} vs {x}")
    if data.empty:
        ax.text(0.5, 0.5, f"no finished run has {plot['y']}", ha="center", va="center", transform=ax.transAxes)
        return fig
    data = data.copy()
    for col in (hue, style):
        if col:
            data[col] = data[col].astype(str)  # categories, not a colour scale
    common = dict(data=data, x=x, y=y, hue=hue, ax=ax)
    if kind == "line":
        sns.lineplot(**common, style=style, marker="o")
    elif kind == "scatter":
        sns.scatterplot(**common, style=style)
    elif kind == "point":
        sns.pointplot(**common)
    elif kind == "bar":
        sns.barplot(**common)
    elif kind == "box":
        sns.boxplot(**common)
    values = data[x]
    spread = values.dtype.kind in "if" and values.min() > 0 and values.max() >= 4 * values.min()
    if kind in ("line", "scatter") and spread:  # lengths: powers of two, evenly spaced
        ticks = sorted(values.unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    ax.grid(alpha=0.3)
    return fig


def figure_name(plot: dict) -> str:
    if plot.get("name"):
        return str(plot["name"])
    y = _PATTERN.sub(lambda m: (m.group(1) + m.group(3)).strip("/"), str(plot["y"]))
    parts = [y, "vs", str(plot["x"])] + (["by", str(plot["hue"])] if plot.get("hue") else [])
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)).strip("_")


def compare(sweep, *, tracking_uri: str | None = None, out_dir=None, log: bool = True):
    """The sweep's points as a DataFrame, and one figure per plot spec, saved as PNG (with runs.csv) in `out_dir`
    (default: results/<name>/ beside the YAML, or ablations/results/<name>/) and logged to the parent run
    under figures/ and tables/. Returns (DataFrame, [figures]). An unwritable `out_dir` is refused before MLflow
    is read; the files replace the previous ones only once all are written."""
    from .outputs import check_writable, staged

    if out_dir is not None:
        check_writable(out_dir, "--out-dir")
    frame, spec, parent = sweep_runs(sweep, tracking_uri=tracking_uri)
    name = spec.get("name") or str(sweep)
    if out_dir is None:
        out_dir = (Path(spec["path"]).parent if spec.get("path") else Path("ablations")) / "results" / name
    out_dir = check_writable(out_dir, "--out-dir")
    figures = []
    with staged(out_dir) as tmp:  # written beside out_dir, moved in once all are written
        for plot in spec.get("plots", []):
            fig = plot_sweep(frame, plot, title=name)
            fig.savefig(tmp / f"{figure_name(plot)}.png", dpi=120, bbox_inches="tight")
            figures.append(fig)
        frame.to_csv(tmp / "runs.csv", index=False)
    if log:
        from .tracking import Tracker

        tracker = Tracker(parent["experiment"], tracking_uri=frame.attrs["tracking_uri"], run_id=parent["run_id"])
        for plot, fig in zip(spec.get("plots", []), figures):
            tracker.log_artifact(out_dir / f"{figure_name(plot)}.png", "figures")
        tracker.log_artifact(out_dir / "runs.csv", "tables")
    frame.attrs["out_dir"] = str(out_dir)
    return frame, figures
