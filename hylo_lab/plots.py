"""Pure functions: evaluation tables -> matplotlib figures (seaborn styling).

Figures are built with `matplotlib.figure.Figure` rather than pyplot, so no global state, GUI backend or
open-figure registry is touched: notebooks display them, `Tracker.log_figure` saves them. Tables with a
`model` column draw one line (or panel) per model, so teacher and student go in one figure.
"""

from __future__ import annotations


def _figure(ncols: int = 1, width: float = 5.0, height: float = 3.6):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _frame(data):
    import pandas as pd

    return data if isinstance(data, pd.DataFrame) else pd.DataFrame(list(data))


def _log2_lengths(ax, lengths):
    lengths = sorted(set(int(x) for x in lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
    ax.minorticks_off()


def niah_heatmap(grid, *, title: str | None = None, annotate: bool | None = None):
    """Accuracy heat map, needle depth (rows, 0 = start of the haystack) x context length (columns).
    `grid`: DataFrame(length, depth, score) such as `run_niah_grid` returns; one panel per `model` if present."""
    import seaborn as sns

    df = _frame(grid)
    groups = list(df.groupby("model", sort=False)) if "model" in df else [(None, df)]
    fig, axes = _figure(len(groups), width=max(4.0, 0.7 * df.length.nunique() + 2.5),
                        height=max(3.0, 0.35 * df.depth.nunique() + 1.5))
    for ax, (name, part) in zip(axes, groups):
        table = part.pivot_table(index="depth", columns="length", values="score", aggfunc="mean", dropna=False)
        table.index = [f"{d:.0%}" for d in table.index]
        show = annotate if annotate is not None else table.size <= 200
        sns.heatmap(table, ax=ax, vmin=0.0, vmax=1.0, cmap="RdYlGn", annot=show, fmt=".2f", cbar=ax is axes[-1],
                    linewidths=0.5, annot_kws={"fontsize": 7})
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(" ".join(x for x in (title, name) if x) or "needle in a haystack")
    return fig


def ruler_curve(table, *, title: str | None = None):
    """RULER accuracy vs context length: one thin line per task and a thick average; with a `model` column,
    one colour per model (tasks thin, averages thick). `table`: run_ruler's "table"."""
    import seaborn as sns

    df = _frame(table)
    df = df[df.status == "ok"] if "status" in df else df
    fig, (ax,) = _figure(1, width=6.0, height=4.0)
    by = ["model", "length"] if "model" in df else ["length"]
    avg = df.groupby(by, as_index=False)["score"].mean()
    if "model" in df:
        sns.lineplot(df, x="length", y="score", hue="model", units="task", estimator=None, ax=ax, alpha=0.25,
                     linewidth=0.8, legend=False)
        sns.lineplot(avg, x="length", y="score", hue="model", ax=ax, linewidth=2.5, marker="o")
    else:
        sns.lineplot(df, x="length", y="score", hue="task", ax=ax, alpha=0.6, linewidth=0.9)
        ax.plot(avg.length, avg.score, color="black", linewidth=2.5, marker="o", label="average")
        ax.legend(fontsize=7, ncols=2)
    if len(df):
        _log2_lengths(ax, df.length)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "RULER")
    return fig


def perplexity_figure(by_length=None, by_position=None, *, title: str | None = None):
    """Perplexity vs context length and/or vs position in the document (bucket centres); hue = `model`."""
    import seaborn as sns

    panels = [(p, x, label) for p, x, label in ((by_length, "length", "context length (tokens)"),
                                                (by_position, "position", "position in document (tokens)"))
              if p is not None]
    fig, axes = _figure(max(1, len(panels)))
    for ax, (data, x, label) in zip(axes, panels):
        df = _frame(data)
        if x == "position":
            df = df.assign(position=(df.start + df.end) / 2)
        sns.lineplot(df, x=x, y="ppl", hue="model" if "model" in df else None, marker="o", ax=ax)
        if x == "length" and len(df):
            _log2_lengths(ax, df.length)
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity")
        ax.set_title(title or "perplexity")
    return fig


def efficiency_figure(rows, *, title: str | None = None):
    """Time to first token, time per output token and cache bytes vs context length (`measure_efficiency`
    rows; hue = `model`). The first out-of-memory length of each model is marked with an x on the TTFT panel."""
    import seaborn as sns

    df = _frame(rows)
    ok = df[df.status == "ok"]
    hue = "model" if "model" in df else None
    fig, axes = _figure(3, width=4.2)
    for ax, (col, label) in zip(axes, (("ttft_s", "time to first token (s)"), ("tpot_s", "time per output token (s)"),
                                       ("cache_bytes_measured", "cache (MiB)"))):
        data = ok.assign(**{col: ok[col] / 2**20}) if col.startswith("cache") else ok
        if len(data):
            sns.lineplot(data, x="length", y=col, hue=hue, marker="o", ax=ax)
            if col.startswith("cache"):
                pred = ok.assign(pred=ok.cache_bytes_predicted / 2**20)
                sns.lineplot(pred, x="length", y="pred", hue=hue, ax=ax, linestyle="--", legend=False)
            _log2_lengths(ax, df.length)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
    oom = df[df.status == "oom"]
    for r in oom.itertuples():
        axes[0].axvline(r.length, color="red", linestyle=":", linewidth=1)
        axes[0].annotate("OOM", (r.length, 0), xycoords=("data", "axes fraction"), color="red", fontsize=8)
    axes[2].set_title("cache: measured (solid), predicted (dashed)", fontsize=9)
    fig.suptitle(title or "inference efficiency")
    return fig
