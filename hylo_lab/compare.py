"""Compare a sweep's runs: its child runs from MLflow as one DataFrame, and the plots its YAML asks for.

A plot spec is {x, y, hue, style, kind, where, title, name}; kind is line (default), point, bar, box or
scatter; `where` keeps the rows whose columns have the given values ({layout: 2MLA2GDN} or {layout: [a, b]}).
`y` is a metric name, or a pattern with one placeholder such as "eval/niah/{length}": every metric matching it
becomes a row of a long table whose `length` column holds the matched part (a number where it parses), so
"NIAH accuracy vs length, one line per layout" is {x: length, y: "eval/niah/{length}", hue: layout}. Only
FINISHED runs are plotted; with several seeds per point seaborn draws the mean and its 95% interval
(errorbar=("ci", 95): a bootstrap over the seeds' rows).

Statistics (hylo_lab.stats): `aggregate` gives per point (the non-seed axes) and metric the mean over seeds, its
95% interval (bootstrap over seeds, stats.SEED_CI) and n; `paired` compares point A with point B over the seeds
both ran (per-seed differences A - B, their mean and bootstrap interval). compare writes them as aggregates.csv
and paired.csv beside runs.csv. Without MLflow, the frame comes from the exported points
(results/<name>/points/*.json, executors.export_result).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .sweep import (METRIC_PATTERN, SweepError, child_runs, export_as_run, find_parent, load_sweep, point_key,
                    runs_frame)

PAIRED_CI = "bootstrap over paired seeds (BCa, 95%)"


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


def exported_runs(sweep_file, points_dir=None):
    """(frame, spec) from the exported points of a sweep YAML, without MLflow: runs.csv regenerated."""
    from .executors import read_exports

    loaded = load_sweep(sweep_file)
    folder = Path(points_dir or loaded.points_dir)
    exported = read_exports(folder)
    if not exported:
        raise SweepError(f"no exported points in {folder}: run `hylo-lab sweep {sweep_file}` first")
    order = {point_key(p): i for i, p in enumerate(loaded.points())}
    runs = [export_as_run(d) for k, d in exported.items() if k in order]
    frame = runs_frame(runs, loaded.axes, newest_first=False)
    frame = frame.sort_values("point", key=lambda s: s.map(order)).reset_index(drop=True)
    frame.attrs.update(parent_run_id=None, tracking_uri=None, sweep=loaded.name, points_dir=str(folder))
    return frame, dict(loaded.spec(), path=str(loaded.path))


def metric_columns(frame, axes) -> list[str]:
    return [c for c in frame.columns if c not in ("point", *axes, "status", "duration_s", "run_id")]


def _finished(frame):
    return frame[frame.status.isin(["FINISHED", "SKIPPED"])] if "status" in frame else frame


def aggregate(frame, axes, metrics=None):
    """One row per point (its non-seed axes) and metric: mean over seeds, low, high (95% bootstrap over seeds),
    n (seeds with a value) and ci (which interval), from the FINISHED rows."""
    from .stats import summarize

    by = [a for a in axes if a != "seed"]
    metrics = metrics if metrics is not None else metric_columns(frame, axes)
    data = _finished(frame).copy()
    for col in by:
        data[col] = data[col].astype(str)  # None and mixed types group as their text
    return summarize(data, by, metrics)


def parse_selector(text: str) -> dict:
    """"layout=2MLA2GDN;linear=gdn" (or commas where no ";" is given) -> {"layout": "2MLA2GDN", "linear": "gdn"};
    with ";" a value may hold commas ("mla_layers=[2, 3]")."""
    out = {}
    for item in text.split(";" if ";" in text else ","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--paired expects KEY=VALUE[;KEY=VALUE...] for each point, got {text!r}")
        out[key.strip()] = value.strip()
    return out


def _seed_values(frame, selector: dict, metric: str, text: str) -> dict:
    missing = [k for k in selector if k not in frame]
    if missing:
        raise SweepError(f"--paired {text}: {', '.join(missing)} is not a column of the sweep's table; use one of "
                         f"{', '.join(c for c in frame.columns if c not in ('status', 'duration_s', 'run_id'))}")
    rows = _finished(frame)
    for key, value in selector.items():  # None / null also match an axis left unset in a point (NaN)
        unset = rows[key].isna() if value in ("None", "null") else False
        rows = rows[(rows[key].astype(str) == value) | unset]
    if rows.empty:
        raise SweepError(f"--paired {text}: no finished point matches")
    seeds = rows["seed"] if "seed" in rows else [0] * len(rows)
    if len(set(seeds)) < len(rows):
        points = sorted(set(rows.point))
        raise SweepError(f"--paired {text}: matches {len(rows) // len(set(seeds))} points per seed "
                         f"({', '.join(points[:4])}); add KEY=VALUE to pick one")
    return {s: float(v) for s, v in zip(seeds, rows[metric]) if v == v}


def paired(frame, a, b, metrics=None):
    """Point A vs point B (selectors: dicts or "KEY=VALUE;..." strings), seeds paired: one row per metric with
    the mean of the per-seed differences A - B, its 95% bootstrap interval, n and the seeds used."""
    import pandas as pd

    from .stats import paired_difference

    texts = [x if isinstance(x, str) else ";".join(f"{k}={v}" for k, v in x.items()) for x in (a, b)]
    sel = [parse_selector(x) if isinstance(x, str) else {k: str(v) for k, v in x.items()} for x in (a, b)]
    if metrics is None:  # runs_frame's columns: point, axes, status, duration_s, run_id, then the metrics
        columns = list(frame.columns)
        metrics = columns[columns.index("run_id") + 1:] if "run_id" in columns else []
    rows = []
    for metric in metrics:
        va, vb = (_seed_values(frame, s, metric, t) for s, t in zip(sel, texts))
        diff = paired_difference(va, vb)
        rows.append(dict(a=texts[0], b=texts[1], metric=metric, mean_a=_mean(va, diff["seeds"]),
                         mean_b=_mean(vb, diff["seeds"]), **diff, ci=PAIRED_CI))
    return pd.DataFrame(rows, columns=["a", "b", "metric", "mean_a", "mean_b", "mean", "low", "high", "n", "seeds",
                                       "ci"])


def _mean(values: dict, seeds) -> float:
    return sum(values[s] for s in seeds) / len(seeds) if seeds else float("nan")


def format_interval(row, n: bool = True) -> str:
    """"0.61 [0.52, 0.70] n=3" ("0.61 [0.52, 0.70]" with n=False); one seed has no interval ("0.61 n=1"), no seed
    no mean ("n=0")."""
    if row["n"] == 0:
        return "n=0"
    text = f"{row['mean']:.3g}" if row["low"] != row["low"] else \
        f"{row['mean']:.3g} [{row['low']:.3g}, {row['high']:.3g}]"
    return f"{text} n={row['n']}" if n else text


def markdown_table(aggregates, patterns=None) -> str:
    """The aggregates as one markdown table: a row per point (its non-seed axes, as observed), a column per metric
    matching `patterns` (the YAML's `metrics`; fnmatch), cells "mean [low, high]" (format_interval; "n=0" where no seed
    has a value), and the interval and n below."""
    import fnmatch

    if aggregates.empty:
        return "no finished point\n"
    by = [c for c in aggregates.columns if c not in ("metric", "mean", "low", "high", "n", "ci")]
    metrics = [m for m in dict.fromkeys(aggregates.metric)
               if not patterns or any(fnmatch.fnmatchcase(m, p) for p in patterns)]
    cells = {(tuple(r[c] for c in by), r["metric"]): r for r in aggregates.to_dict("records")}
    points = list(dict.fromkeys(key for key, _ in cells))
    lines = ["| " + " | ".join(by + metrics) + " |", "|" + "---|" * (len(by) + len(metrics))]
    for point in points:
        row = [cells.get((point, m)) for m in metrics]
        lines.append("| " + " | ".join([str(v) for v in point] +
                                       ["" if r is None else format_interval(r, n=False) for r in row]) + " |")
    ns = sorted({int(r["n"]) for r in cells.values()})
    return "\n".join(lines) + f"\n\nmean over seeds [95% CI]; {aggregates.ci.iloc[0]}; n = {ns} seeds per point\n"


def long_form(frame, y: str):
    """(table, y column, x column or None): a pattern y melts its matching metric columns into rows."""
    import pandas as pd

    match = METRIC_PATTERN.fullmatch(y)
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
    ci = dict(errorbar=("ci", 95), seed=0)  # bootstrap over the rows of a point: its seeds
    if kind == "line":
        sns.lineplot(**common, style=style, marker="o", **ci)
    elif kind == "scatter":
        sns.scatterplot(**common, style=style)
    elif kind == "point":
        sns.pointplot(**common, **ci)
    elif kind == "bar":
        sns.barplot(**common, **ci)
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
    y = METRIC_PATTERN.sub(lambda m: (m.group(1) + m.group(3)).strip("/"), str(plot["y"]))
    parts = [y, "vs", str(plot["x"])] + (["by", str(plot["hue"])] if plot.get("hue") else [])
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "_".join(parts)).strip("_")


def compare(sweep, *, tracking_uri: str | None = None, out_dir=None, log: bool = True, paired_points=None,
            from_points: bool = False, points_dir=None):
    """The sweep's points as a DataFrame, and one figure per plot spec, saved as PNG (with runs.csv,
    aggregates.csv, aggregates.md (markdown_table) and, for `paired_points` = [(A, B), ...], paired.csv) in
    `out_dir` (default: results/<name>/ beside the YAML, or ablations/results/<name>/) and logged to the parent
    run under figures/ and tables/. from_points: read the YAML's exported points (or `points_dir`) instead of
    MLflow. Returns (DataFrame, [figures]); frame.attrs holds `aggregates` and `paired` as lists of rows. An
    unwritable `out_dir` is refused before MLflow is read; the files replace the previous ones only once all are
    written."""
    from .outputs import check_writable, staged

    if out_dir is not None:
        check_writable(out_dir, "--out-dir")
    if from_points or points_dir:
        frame, spec = exported_runs(sweep, points_dir)
        parent, log = None, False
    else:
        frame, spec, parent = sweep_runs(sweep, tracking_uri=tracking_uri)
    axes = spec.get("axes", [])
    aggregates = aggregate(frame, axes)
    pairs = [paired(frame, a, b) for a, b in paired_points or []]
    import pandas as pd

    pairs = pd.concat(pairs, ignore_index=True) if pairs else None
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
        aggregates.to_csv(tmp / "aggregates.csv", index=False)
        (tmp / "aggregates.md").write_text(markdown_table(aggregates, spec.get("metrics")))
        if pairs is not None:
            pairs.to_csv(tmp / "paired.csv", index=False)
    if log:
        from .tracking import Tracker

        tracker = Tracker(parent["experiment"], tracking_uri=frame.attrs["tracking_uri"], run_id=parent["run_id"])
        for plot, fig in zip(spec.get("plots", []), figures):
            tracker.log_artifact(out_dir / f"{figure_name(plot)}.png", "figures")
        tracker.log_artifact(out_dir / "runs.csv", "tables")
        tracker.log_artifact(out_dir / "aggregates.csv", "tables")
        if pairs is not None:
            tracker.log_artifact(out_dir / "paired.csv", "tables")
    frame.attrs.update(out_dir=str(out_dir), aggregates=aggregates.to_dict("records"),
                       paired=[] if pairs is None else pairs.to_dict("records"))
    return frame, figures


def print_statistics(frame, echo=print) -> None:
    """The aggregates (mean [95% CI] n per point and metric) and paired comparisons that compare computed."""
    import pandas as pd

    agg = pd.DataFrame(frame.attrs.get("aggregates") or [])
    if not agg.empty:
        by = [c for c in agg.columns if c not in ("metric", "mean", "low", "high", "n", "ci")]
        agg["value"] = agg.apply(format_interval, axis=1)
        table = agg.pivot_table(index=by, columns="metric", values="value", aggfunc="first", sort=False) if by else (
            agg.set_index("metric")[["value"]].T)
        echo(f"mean over seeds [95% CI] n ({agg.ci.iloc[0]}):")
        echo(table.to_string())
    for row in frame.attrs.get("paired") or []:
        echo(f"{row['a']} - {row['b']}, {row['metric']}: {format_interval(row)} (seeds {row['seeds']}; {row['ci']})")
