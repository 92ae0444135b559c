"""What the demo shows: the house-style figures, the summary (goals, ratios, timings) logged once, the report's
head (question, headline, goals table, conclusion) and the terminal summary of `hylo-lab demo`."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from ..data.toy import TOY_TRAIN_LEN
from .settings import DemoSettings, log, step


def model_labels(settings: DemoSettings) -> dict:
    """How the figures and the report name the demo's models: the hybrid with its layout."""
    base = settings.base
    return dict(teacher=f"teacher {base}", teacher_yarn=f"teacher {base} + YaRN x{settings.teacher_yarn_factor:g}",
                hybrid=f"hybrid {settings.student_layout}")


def figures(settings: DemoSettings, results, tracker=None) -> dict:
    """The report's figures in the house style (hylo_lab.plots), saved to figures/ and logged:
    niah_vs_length (Wilson intervals over the samples evaluated, the 0.8 goal) and cache_vs_length (teacher vs
    hybrid, measured filled, predicted hollow, the ratio at the longest length)."""
    from ..plots import cache_curve, context_curve

    labels = model_labels(settings)
    figs = dict(
        niah_vs_length=context_curve(results, train_len=TOY_TRAIN_LEN, labels=labels, bar=0.8,
                                     title="Needle retrieval beyond the training length"),
        cache_vs_length=cache_curve(results[results.model.isin(["teacher", "hybrid"])], train_len=TOY_TRAIN_LEN,
                                    labels=labels, title="Cache after the prompt (filled: measured, hollow: predicted)"),
    )
    for name, fig in figs.items():
        save_figure(settings, fig, name, tracker)
    return figs


def show_figure(settings: DemoSettings, name: str):
    """figures/<name>.png as an image the notebook (and its HTML) embeds."""
    from IPython.display import Image

    return Image(filename=str(settings.folder / "figures" / f"{name}.png"))


def save_figure(settings: DemoSettings, fig, name: str, tracker=None) -> Path:
    path = settings.folder / "figures" / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    if tracker is not None:
        tracker.log_artifact(path, "figures")
    return path


def summarize(settings: DemoSettings, results, teacher_report: dict | None = None, tracker=None) -> dict:
    """The numbers the demo must show, from the results table, as a dict: the run's summary (tables/summary.json
    and `summary.*` tags in MLflow) and summary.json in the output folder, which holds no absolute path."""
    step(settings, "report")
    pivot = results.pivot_table(index="length", columns="model", values="niah", sort=True)
    longest = max(settings.lengths)
    beyond = [n for n in settings.lengths if n > 4 * TOY_TRAIN_LEN]
    short = TOY_TRAIN_LEN if TOY_TRAIN_LEN in settings.lengths else min(settings.lengths)
    ppl = results[results.length == short].set_index("model")["ppl"]
    cache = results[results.length == longest].set_index("model")["cache_bytes"].astype(float)
    out = dict(
        quick=settings.quick,
        teacher_niah_1x=float(pivot.loc[short, "teacher"]),
        hybrid_niah_longest=float(pivot.loc[longest, "hybrid"]),
        longest=longest,
        longest_multiple=longest / TOY_TRAIN_LEN,
        teacher_niah_beyond_4x_max=float(pivot.loc[beyond, "teacher"].max()) if beyond else math.nan,
        teacher_yarn_niah_beyond_4x_max=float(pivot.loc[beyond, "teacher_yarn"].max()) if beyond else math.nan,
        teacher_ppl=float(ppl["teacher"]),
        hybrid_ppl=float(ppl["hybrid"]),
        ppl_ratio=float(ppl["hybrid"] / ppl["teacher"]),
        cache_ratio_longest=float(cache["hybrid"] / cache["teacher"]),
        seconds=time.perf_counter() - getattr(settings, "_t0", time.perf_counter()),
    )
    if teacher_report:
        out["teacher_check_niah"] = teacher_report["niah"]
        out["teacher_check_ppl_vs_unigram"] = teacher_report["heldout_ppl"] / teacher_report["unigram_ppl"]
    out["goals"] = dict(
        teacher_niah_1x_ge_95=out["teacher_niah_1x"] >= 0.95,
        hybrid_niah_32x_ge_80=out["hybrid_niah_longest"] >= 0.8 and out["longest_multiple"] >= 32,
        teachers_below_20_beyond_4x=bool(beyond) and max(out["teacher_niah_beyond_4x_max"],
                                                         out["teacher_yarn_niah_beyond_4x_max"]) < 0.2,
        ppl_within_10pct=out["ppl_ratio"] <= 1.10,
    )
    out["seconds_by_step"] = dict(getattr(settings, "_seconds", {}))
    out["teachers"] = dict(getattr(settings, "_teachers", {}))
    if tracker is not None and tracker.active:
        out.update(run_id=tracker.run_id, tracking_uri=relative_uri(tracker.tracking_uri),
                   experiment=settings.experiment, run_url=tracker.url())
    (settings.folder / "summary.json").write_text(json.dumps(out, indent=2))
    if tracker is not None and tracker.active:
        tracker.log_summary({k: v for k, v in out.items() if k not in ("run_id", "tracking_uri", "run_url")})
    log(f"done in {out['seconds']:.0f} s; goals: {out['goals']}")
    return out


def relative_uri(uri: str) -> str:
    """sqlite:////abs/cwd/mlflow.db -> sqlite:///mlflow.db (relative to the working folder); other URIs unchanged."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        if path.is_absolute() and path.is_relative_to(Path.cwd()):
            return prefix + str(path.relative_to(Path.cwd()))
    return uri


# Each goal: what it asks, in words (the report's goals table).
GOALS = dict(
    teacher_niah_1x_ge_95="the teacher retrieves the needle at its training length (NIAH >= 0.95 at 1x)",
    hybrid_niah_32x_ge_80="the hybrid retrieves it at 32x the teacher's training length (NIAH >= 0.80)",
    teachers_below_20_beyond_4x="the teacher, with or without YaRN, fails beyond 4x (NIAH < 0.20)",
    ppl_within_10pct="the hybrid's short-context perplexity is within 10% of the teacher's",
)
QUESTION = ("Does the HyLo recipe (upcycle a Transformer into MLA + linear layers, distil it with YaRN on the MLA "
            "layers) give a hybrid that retrieves a needle far beyond its teacher's training length, with a much "
            "smaller cache, at no cost in short-context perplexity?")


def conclusion(summary: dict, layout: str = "the hybrid") -> str:
    """A few sentences written from the numbers of `summary` (what summarize returns)."""
    s, goals = summary, summary["goals"]
    met = sum(bool(v) for v in goals.values())
    longest = f"{s['longest']} tokens ({s['longest_multiple']:g}x the training length)"
    parts = [f"Hybrid {layout}: NIAH {s['hybrid_niah_longest']:.2f} at {longest}, with "
             f"{s['cache_ratio_longest']:.2f}x the teacher's cache there and {s['ppl_ratio']:.2f}x its "
             f"short-context perplexity."]
    if not math.isnan(s.get("teacher_niah_beyond_4x_max", math.nan)):
        parts.append(f"Beyond 4x the teacher reaches at most {s['teacher_niah_beyond_4x_max']:.2f} "
                     f"({s['teacher_yarn_niah_beyond_4x_max']:.2f} with YaRN).")
    parts.append(f"{met} of {len(goals)} goals met" + (" (quick run: untrained toy models, the numbers only show "
                                                         "that every step runs)." if s["quick"] else "."))
    return " ".join(parts)


def report(summary: dict, settings: DemoSettings | None = None):
    """The head of the report (a Markdown display): the question, the headline, the goals table, the conclusion."""
    from IPython.display import Markdown

    layout = settings.student_layout if settings is not None else "the hybrid"
    s = summary
    headline = (f"**Headline.** NIAH **{s['hybrid_niah_longest']:.2f}** at {s['longest_multiple']:g}x the training "
                f"length for the hybrid {layout}, vs {s['teacher_niah_1x']:.2f} for the teacher at 1x; cache "
                f"**{s['cache_ratio_longest']:.2f}x** the teacher's; perplexity ratio {s['ppl_ratio']:.2f}.")
    rows = ["| goal | met |", "|---|---|"] + [f"| {GOALS.get(k, k)} | {'yes' if v else 'no'} |"
                                             for k, v in s["goals"].items()]
    took = f"Run took {s['seconds'] / 60:.1f} min" + (f"; MLflow run: {s['run_url']}" if s.get("run_url") else "")
    return Markdown("\n\n".join(["## Results", f"**Question.** {QUESTION}", headline, "\n".join(rows),
                                   f"**Conclusion.** {conclusion(s, layout)}", took]))


def summary_table(results):
    """NIAH / ppl / cache (KiB) per model and length, as printed by `hylo-lab demo`."""
    import pandas as pd

    niah = results.pivot_table(index="model", columns="length", values="niah", sort=False)
    niah.index = [f"NIAH {m}" for m in niah.index]
    cache = results.pivot_table(index="model", columns="length", values="cache_bytes", sort=False) / 1024
    cache = cache.loc[[m for m in ("teacher", "hybrid") if m in cache.index]]
    cache.index = [f"cache KiB {m}" for m in cache.index]
    table = pd.concat([niah.round(2), cache.round(0)])
    table.columns = [str(c) for c in table.columns]
    return table


def _shown(path) -> str:
    """`path` relative to the working folder where it lies inside it."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_absolute() and path.is_relative_to(Path.cwd()) else str(path)


def report_text(summary: dict) -> str:
    import pandas as pd

    results = pd.read_csv(Path(summary["out_dir"]) / "results.csv")
    lines = [summary_table(results).to_string(), ""]
    lines.append(f"short-context perplexity: teacher {summary['teacher_ppl']:.3f}, hybrid {summary['hybrid_ppl']:.3f} "
                 f"(ratio {summary['ppl_ratio']:.3f}); cache at {summary['longest']} tokens: hybrid / teacher = "
                 f"{summary['cache_ratio_longest']:.3f}")
    lines.append("goals: " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in summary["goals"].items()))
    lines += ["", conclusion(summary), "", f"report:   {_shown(summary['html'])} (open it in a browser)",
              f"notebook: {_shown(summary['notebook'])}",
              "figures:  " + ", ".join(_shown(f) for f in summary["figures"]),
              f"took {summary['wall_seconds'] / 60:.1f} min"]
    if summary.get("run_url"):
        lines.append(f"MLflow run: {summary['run_url']} (`make mlflow-ui` serves it)")
    return "\n".join(lines)
