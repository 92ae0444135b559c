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


def svd_spectra_figure(spectra, *, title: str | None = None):
    """The SVD initialisation of MLA at a glance (`nbtools.svd_spectra`): cumulative singular-value energy vs rank
    of the query and [K_nope; V] matrices, one line per layer (MLA layers of the plan solid, others dotted) with the
    kept rank dashed; last panel: the energy each layer keeps at that rank."""
    import seaborn as sns

    df = _frame(spectra)
    matrices = [m for m in ("q", "kv") if m in set(df.matrix)]
    fig, axes = _figure(len(matrices) + 1, width=4.4)
    palette = dict(zip(sorted(df.layer.unique()), sns.color_palette("viridis", df.layer.nunique())))
    for ax, m in zip(axes, matrices):
        part = df[df.matrix == m]
        for layer, g in part.groupby("layer"):
            ax.plot(g["index"], g.energy, color=palette[layer], linestyle="-" if g.mla.iloc[0] else ":",
                    label=f"{layer}{' (MLA)' if g.mla.iloc[0] else ''}")
        ax.axvline(part["rank"].iloc[0], color="black", linestyle="--", linewidth=1)
        ax.set_xlabel("rank")
        ax.set_ylabel("cumulative energy")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{'query' if m == 'q' else '[K_nope; V]'}: rank {part['rank'].iloc[0]} kept")
        ax.legend(title="layer", fontsize=7, ncols=2)
    kept = df[df["index"] <= df["rank"]].groupby(["layer", "matrix"], as_index=False).agg(
        kept=("energy", "max"), mla=("mla", "first"))
    sns.barplot(kept, x="layer", y="kept", hue="matrix", hue_order=matrices, ax=axes[-1])
    axes[-1].legend(title="matrix", fontsize=7, loc="lower right")
    axes[-1].set_ylim(0, 1.02)
    axes[-1].set_ylabel("energy kept at the rank")
    axes[-1].set_title("kept energy per layer (MLA layers: " + ", ".join(
        str(x) for x in sorted(kept[kept.mla].layer.unique())) + ")")
    fig.suptitle(title or "SVD spectra of the MLA factorisation")
    return fig


def layer_kl_figure(table, *, mla_layers=(), hybrid_kl: float | None = None, title: str | None = None):
    """KL(teacher || base with one layer converted) per layer and block kind (`nbtools.layer_kl`); the plan's MLA
    layers are starred, and the converted hybrid's own KL is a dashed line when given."""
    import seaborn as sns

    df = _frame(table)
    fig, (ax,) = _figure(1, width=max(5.0, 0.5 * df.layer.nunique() * df.kind.nunique() + 2), height=3.8)
    sns.barplot(df, x="layer", y="kl", hue="kind", ax=ax)
    ax.set_xticks(range(df.layer.nunique()),
                  [f"{i}*" if i in set(mla_layers) else str(i) for i in sorted(df.layer.unique())])
    if hybrid_kl is not None:
        ax.axhline(hybrid_kl, color="black", linestyle="--", linewidth=1, label=f"hybrid {hybrid_kl:.3f}")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("converted layer (* = MLA in the plan)")
    ax.set_ylabel("KL to the teacher at init")
    ax.set_title(title or "what converting one layer costs")
    return fig


def loss_curves(history, *, title: str | None = None):
    """Training loss and held-out KL vs step, one line per training run (`nbtools.LiveLoss.history()`:
    run, split "train" | "eval", step, value)."""
    import seaborn as sns

    df = _frame(history)
    fig, axes = _figure(2, width=5.0, height=3.4)
    for ax, (split, label) in zip(axes, (("train", "training loss"), ("eval", "held-out KL to the teacher"))):
        part = df[df.split == split]
        if len(part):
            sns.lineplot(part, x="step", y="value", hue="run", marker="o" if split == "eval" else None, ax=ax)
            if (part.value > 0).all():
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title or "distillation")
    return fig


def sweep_overview(frame, metrics=(), *, max_metrics: int = 8, title: str | None = None):
    """A sweep's table at a glance (`compare.sweep_runs` frame): each point's duration and status, and up to
    `max_metrics` metrics (the given ones, else the first columns after run_id) per point."""
    import seaborn as sns

    df = _frame(frame)
    cols = list(df.columns)
    candidates = cols[cols.index("run_id") + 1:] if "run_id" in cols else []
    names = [m for m in (metrics or candidates) if m in cols][:max_metrics]
    fig, axes = _figure(2, width=5.2, height=max(3.0, 0.35 * len(df) + 1.5))
    sns.barplot(df, y="point", x="duration_s", hue="status", dodge=False, ax=axes[0])
    axes[0].set_xlabel("duration (s)")
    axes[0].set_title("points")
    long = df.melt(id_vars=["point"], value_vars=names, var_name="metric", value_name="value").dropna()
    if len(long):
        sns.barplot(long, y="point", x="value", hue="metric", ax=axes[1])
        axes[1].legend(fontsize=7)
    else:
        axes[1].text(0.5, 0.5, "no metrics", ha="center", va="center", transform=axes[1].transAxes)
    axes[1].set_ylabel("")
    axes[1].set_title("metrics")
    fig.suptitle(title or "sweep")
    return fig


# House style for the figures a report leads with: one colour per model everywhere, x in multiples of the
# training length (tokens beneath), the training length marked, intervals and n drawn where they exist.
MODEL_COLORS = {"teacher": "#4c72b0", "teacher_yarn": "#8172b3", "hybrid": "#dd8452", "llama": "#4c72b0",
                "base": "#4c72b0"}
_EXTRA = ("#55a868", "#c44e52", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def model_color(name: str) -> str:
    """The colour of a model in every figure: fixed for the demo's models, stable by name for the rest."""
    if name in MODEL_COLORS:
        return MODEL_COLORS[name]
    return _EXTRA[sum(map(ord, str(name))) % len(_EXTRA)]


def _multiple_axis(ax, lengths, train_len: int):
    """log2 x axis labelled "4x" over "1K" (tokens), the training length marked with a labelled line."""
    lengths = sorted(set(int(x) for x in lengths))
    ax.set_xscale("log", base=2)
    tokens = [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths]
    ax.set_xticks(lengths, [f"{n / train_len:g}x\n{t}" for n, t in zip(lengths, tokens)])
    ax.minorticks_off()
    ax.axvline(train_len, color="grey", linestyle=":", linewidth=1)
    ax.annotate(f"training length ({train_len})", (train_len, 1.0), xycoords=("data", "axes fraction"),
                xytext=(3, -3), textcoords="offset points", fontsize=7, color="grey", va="top")
    ax.set_xlabel("context length (multiple of the training length; tokens)")


def _aggregate(df, y: str):
    """Rows of (model, length[, seed]) -> per (model, length): mean, low, high, n. Several seeds: the bootstrap
    interval over seeds; one row with `{y}_low`/`{y}_high` columns: those; else no interval."""
    import pandas as pd

    from .stats import mean_ci

    rows = []
    for (model, length), part in df.groupby(["model", "length"], sort=False):
        if len(part) > 1:
            ci = mean_ci(part[y].astype(float))
            rows.append(dict(model=model, length=length, mean=ci["mean"], low=ci["low"], high=ci["high"],
                             n=ci["n"], what="seeds"))
        else:
            r = part.iloc[0]
            rows.append(dict(model=model, length=length, mean=float(r[y]), low=r.get(f"{y}_low", float("nan")),
                             high=r.get(f"{y}_high", float("nan")), n=r.get("n", 1), what="samples"))
    return pd.DataFrame(rows)


def context_curve(results, *, train_len: int, y: str = "niah", ylabel: str = "NIAH accuracy",
                  labels: dict | None = None, title: str | None = None, bar: float | None = None):
    """A score vs context length, one line per model in its house colour, 95% intervals as bands.
    `results`: rows (model, length, y) with one row per seed, or per model and length with optional
    `{y}_low`, `{y}_high` and `n` (evaluation samples). `bar` draws a goal line."""
    df = _frame(results)
    agg = _aggregate(df, y)
    fig, (ax,) = _figure(1, width=6.4, height=4.0)
    for model, part in agg.groupby("model", sort=False):
        part = part.sort_values("length")
        color = model_color(model)
        ax.plot(part.length, part["mean"], marker="o", color=color, label=(labels or {}).get(model, model))
        if part.low.notna().any():
            ax.fill_between(part.length, part.low.astype(float), part.high.astype(float), color=color, alpha=0.18,
                            linewidth=0)
    if bar is not None:
        ax.axhline(bar, color="black", linestyle="--", linewidth=0.8)
        ax.annotate(f"goal {bar:g}", (1.0, bar), xycoords=("axes fraction", "data"), xytext=(-3, 3),
                    textcoords="offset points", ha="right", fontsize=7)
    if len(agg):
        _multiple_axis(ax, agg.length, train_len)
    ax.set_ylim(-0.03, 1.03) if y in ("niah", "accuracy", "score") else None
    ax.set_ylabel(ylabel)
    ns = sorted({int(n) for n in agg.n.dropna()})
    what = "seeds" if (agg.what == "seeds").any() else "samples per length"
    band = "95% CI (bootstrap over seeds)" if what == "seeds" else "95% CI (Wilson over samples)"
    note = f"bands: {band}; n = {ns[0] if len(ns) == 1 else f'{ns[0]}-{ns[-1]}'} {what}" if ns else ""
    ax.set_title(title or f"{ylabel} vs context length", fontsize=10)
    if note and agg.low.notna().any():
        ax.text(0.0, -0.32, note, transform=ax.transAxes, fontsize=7, color="dimgrey")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3)
    return fig


def cache_curve(results, *, train_len: int, labels: dict | None = None, title: str | None = None):
    """Cache bytes after the prompt vs context length (log-log), one line per model in its house colour:
    measured points filled, predicted ones hollow; the ratio of the first model to the others at the longest
    length annotated. `results`: rows (model, length, cache_bytes[, cache_bytes_measured])."""
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    df = _frame(results)
    fig, (ax,) = _figure(1, width=6.4, height=4.0)
    longest = int(df.length.max())
    at_longest = {}
    for model, part in df.groupby("model", sort=False):
        part = part.sort_values("length")
        color = model_color(model)
        mib = part.cache_bytes.astype(float) / 2**20
        ax.plot(part.length, mib, color=color, label=(labels or {}).get(model, model))
        measured = part.get("cache_bytes_measured", part.cache_bytes * np.nan).notna().to_numpy()
        ax.scatter(part.length[measured], mib[measured], color=color, zorder=3)
        ax.scatter(part.length[~measured], mib[~measured], facecolors="white", edgecolors=color, zorder=3)
        at_longest[model] = float(mib.iloc[-1])
    models = list(at_longest)
    if len(models) > 1:
        ref = at_longest[models[0]]
        for m in models[1:]:
            ax.annotate(f"{at_longest[m] / ref:.2f}x {(labels or {}).get(models[0], models[0])}",
                        (longest, at_longest[m]), xytext=(-4, -12), textcoords="offset points", ha="right",
                        fontsize=8, color=model_color(m))
    _multiple_axis(ax, df.length, train_len)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("cache after the prompt (MiB)")
    ax.set_title(title or "cache vs context length (filled: measured, hollow: predicted)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(alpha=0.3, which="both")
    return fig
