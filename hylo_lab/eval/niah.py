"""The needle-in-a-haystack grid: accuracy over context length x needle depth, drawn as a heat map.

Every cell uses the same seeds, so the needles say the same thing at every length and depth: only where they
sit and how much haystack surrounds them changes (data/tasks/).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ..data import tasks as T
from .ruler import GenerateFn, active, answer_samples, log_run, save_run

DEFAULT_DEPTHS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def run_niah_grid(model, tokenizer, lengths, depths=DEFAULT_DEPTHS, *, task: str = "niah_single_1",
                  num_samples: int = 4, seed: int = 0, haystack: str | None = None, batch_size: int = 1,
                  prefill_chunk: int | None = None, generate_fn: GenerateFn | None = None, tracker=None,
                  out_dir=None, label: str = ""):
    """Accuracy of `task` (a niah_* task) for every length x depth, seeds seed .. seed+num_samples-1.

    Returns a DataFrame(length, depth, score, n, status) -- status "not_run" for a length too short for the task
    -- with `.attrs["not_run"]` (why) and `.attrs["task"]`. With `out_dir` or a tracker, the samples, per-sample
    predictions and the grid are saved (samples.jsonl, predictions.jsonl, niah_grid.csv); the metrics
    `eval/niah/[label/]<length>/<depth>` and `eval/niah/[label/]average` and the heat map `niah[_label]` are logged.
    """
    import pandas as pd

    from ..plots import niah_heatmap

    if task not in T.NIAH_TASKS:
        raise ValueError(f"the NIAH grid needs a niah_* task, got {task!r}")
    tracker = active(tracker)
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    depths = [float(d) for d in depths]
    samples, not_run = [], {}
    for length in lengths:
        try:
            samples += [T.generate_sample(task, tokenizer, length, depth=d, seed=seed + i, haystack=haystack)
                        for d in depths for i in range(num_samples)]
        except T.LengthTooShortError as e:
            not_run[f"{task}@{length}"] = str(e)
    records = answer_samples(model, tokenizer, samples, batch_size=batch_size, prefill_chunk=prefill_chunk,
                             generate_fn=generate_fn)
    rows = []
    for length in lengths:
        for d in depths:
            got = [r["score"] for r in records if r["length"] == length and r["depth"] == d]
            rows.append(dict(length=length, depth=d, score=sum(got) / len(got) if got else float("nan"), n=len(got),
                             status="ok" if got else "not_run"))
    grid = pd.DataFrame(rows, columns=["length", "depth", "score", "n", "status"])
    grid.attrs.update(not_run=not_run, task=task)
    if out_dir is None and tracker is None:
        return grid
    prefix = f"eval/niah/{label + '/' if label else ''}"
    metrics = {f"{prefix}{r.length}/{r.depth:g}": r.score for r in grid.itertuples() if r.status == "ok"}
    metrics[f"{prefix}average"] = grid.score.mean()
    summary = dict(suite="niah", label=label, task=task, lengths=lengths, depths=depths, num_samples=num_samples,
                   seed=seed, haystack=haystack, not_run=not_run, average=grid.score.mean())
    name = f"niah{'_' + label if label else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(out_dir) if out_dir is not None else Path(tmp)
        save_run(path, samples, records, dict(niah_grid=grid), summary)
        fig = niah_heatmap(grid, title=f"NIAH {task} {label}".strip())
        log_run(tracker, path, name, metrics, {name: fig})
        if out_dir is not None:
            fig.savefig(path / f"{name}.png", dpi=120, bbox_inches="tight")
    return grid
