"""The RULER-style suite: generate samples (data/tasks/), decode answers with the cache, score, save, log.

One call per model: `run_ruler(model, tokenizer, [256, 512, 1024])` returns per task x length accuracy, the
average over the tasks that ran at each length, and what did not run and why (QA tasks without a `qa_file`,
lengths too short for a task) -- never silently dropped. The generated samples and the predictions are saved
next to the scores (`out_dir`) and logged as artifacts when a tracker is given.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..data import tasks as T
from .generation import generate_answers

# (samples) -> predictions: the default decodes with the model; tests and baselines pass an oracle instead.
GenerateFn = Callable[[list], list]


def answer_samples(model, tokenizer, samples, *, batch_size: int = 1, prefill_chunk: int | None = None,
                   generate_fn: GenerateFn | None = None) -> list[dict]:
    """Predict and score every sample -> records {task, length, depth, seed, answers, prediction, score}."""
    if generate_fn is not None:
        preds = list(generate_fn(list(samples)))
    else:
        preds = generate_answers(model, tokenizer, list(samples), batch_size=batch_size, prefill_chunk=prefill_chunk)
    if len(preds) != len(samples):
        raise ValueError(f"{len(preds)} predictions for {len(samples)} samples")
    return [dict(task=s.task, length=s.length, depth=s.depth, seed=s.meta.get("seed"), answers=list(s.answers),
                 prediction=p, score=T.score_sample(s.task, p, s.answers)) for s, p in zip(samples, preds)]


def save_run(out_dir: Path, samples, records: list[dict], tables: dict, summary: dict) -> None:
    """samples.jsonl (the prompts as generated), predictions.jsonl, one csv per table, summary.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    T.save_samples(samples, out_dir / "samples.jsonl")
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    for name, df in tables.items():
        df.to_csv(out_dir / f"{name}.csv", index=False)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def active(tracker):
    """The tracker if it logs (a disabled or failed Tracker reports `active` False), else None."""
    return tracker if tracker is not None and getattr(tracker, "active", True) else None


def log_run(tracker, out_dir: Path, artifact_path: str, metrics: dict, figures: dict) -> None:
    if tracker is None:
        return
    tracker.log_metrics(metrics)
    for name, fig in figures.items():
        tracker.log_figure(fig, name)
    tracker.log_artifact(out_dir, artifact_path)


def ruler_tables(records: list[dict], tasks, lengths, not_run: dict):
    """(table: one row per task x length with status "ok" | "not_run", averages: one row per length)."""
    import pandas as pd

    rows = []
    for length in lengths:
        for task in tasks:
            got = [r["score"] for r in records if r["task"] == task and r["length"] == length]
            reason = not_run.get(task) or not_run.get(f"{task}@{length}")
            if got:
                rows.append(dict(task=task, length=length, score=sum(got) / len(got), n=len(got), status="ok",
                                 reason=""))
            else:
                rows.append(dict(task=task, length=length, score=float("nan"), n=0, status="not_run",
                                 reason=reason or "no samples"))
    table = pd.DataFrame(rows, columns=["task", "length", "score", "n", "status", "reason"])
    avg = []
    for length in lengths:
        ok = table[(table.length == length) & (table.status == "ok")]
        avg.append(dict(length=length, average=ok.score.mean() if len(ok) else float("nan"),
                        tasks_run=len(ok), tasks_requested=len(tasks), complete=len(ok) == len(tasks)))
    return table, pd.DataFrame(avg)


def run_ruler(model, tokenizer, lengths, *, tasks=T.RULER_TASKS, num_samples: int = 4, seed: int = 0,
              haystack: str | None = None, qa_file=None, batch_size: int = 1, prefill_chunk: int | None = None,
              generate_fn: GenerateFn | None = None, tracker=None, out_dir=None, label: str = "") -> dict:
    """RULER-style accuracy of `model` per task x length, seeds seed .. seed+num_samples-1 (data/tasks/).

    Returns {"table": DataFrame(task, length, score, n, status, reason), "average": DataFrame(length, average,
    tasks_run, tasks_requested, complete), "not_run": {task | task@length: why}, "records": per-sample
    predictions, "out_dir": where samples, predictions and tables were saved (a temporary folder when only a
    tracker is given)}. Logs `eval/ruler/<length>/<task>` and `eval/ruler/<length>/average` (prefixed by
    `label/` when given, to compare models in one run) and the figure `ruler[_label]`.
    """
    from ..plots import ruler_curve

    tracker = active(tracker)
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    samples = T.generate_suite(tasks, tokenizer, lengths, num_samples=num_samples, seed=seed, haystack=haystack,
                               qa_file=qa_file)
    records = answer_samples(model, tokenizer, samples, batch_size=batch_size, prefill_chunk=prefill_chunk,
                             generate_fn=generate_fn)
    table, average = ruler_tables(records, tasks, lengths, samples.not_run)
    result = dict(table=table, average=average, not_run=dict(samples.not_run), records=records, out_dir=None)
    if out_dir is None and tracker is None:
        return result
    prefix = f"eval/ruler/{label + '/' if label else ''}"
    metrics = {f"{prefix}{r.length}/{r.task}": r.score for r in table.itertuples() if r.status == "ok"}
    metrics.update({f"{prefix}{r.length}/average": r.average for r in average.itertuples()})
    summary = dict(suite="ruler", label=label, lengths=lengths, tasks=tasks, num_samples=num_samples, seed=seed,
                   haystack=haystack, qa_file=qa_file, not_run=result["not_run"],
                   average={int(r.length): r.average for r in average.itertuples()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir) if out_dir is not None else Path(tmp)
        save_run(path, samples, records, dict(ruler_scores=table, ruler_average=average), summary)
        fig = ruler_curve(table, title=f"RULER {label}".strip())
        name = f"ruler{'_' + label if label else ''}"
        log_run(tracker, path, name, metrics, {name: fig})
        if out_dir is not None:
            fig.savefig(path / f"{name}.png", dpi=120, bbox_inches="tight")
            result["out_dir"] = path
        result["figure"] = fig
    return result
