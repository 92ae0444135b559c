"""Held-out evaluation of a training run, its divergence check, and the names of every metric a run logs.

    eval/<run>/kl        free-running forward KL(teacher || student) per token on the held-out rows (ild.heldout_kl)
    eval/<run>/ild       stage 1 only: the teacher-forced ILD loss, mean over row batches
    train/<run>/{loss, lr, grad_norm, tokens_per_s, tokens}, and each loss part: train/<run>/<part>[/<layer>]
Held-out rows are split over processes (rows r, r + n, ...; a remainder that does not split is dropped) and the
sums reduced, so 1 or N processes report the same number.
A run diverges when a held-out KL exceeds DIVERGED x the best one so far (and at least DIVERGED x 1e-3).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .ild import teacher_states
from .kd import teacher_kd_targets

DIVERGED = 10.0  # a held-out KL above this multiple of the run's best so far is reported as divergence


def kl_name(run: str) -> str:
    return f"eval/{run}/kl"


def heldout_metrics(acc, wrapper, teacher, rows, *, run: str, micro: int, autocast, ild: bool,
                    seq_len: int) -> dict:
    """{eval/<run>/kl[, eval/<run>/ild]} on held-out `rows` [N, seq_len]; {} without rows (None, or fewer than
    processes). Collective: every process calls it."""
    if rows is None:
        return {}
    device, rank, n_proc = acc.device, acc.process_index, acc.num_processes
    wrapper.eval()
    rows = rows[: (len(rows) // n_proc) * n_proc][rank::n_proc]
    kl_sum, n_tok, ild_sum = (torch.zeros((), device=device) for _ in range(3))
    with torch.no_grad():
        for i in range(0, len(rows), micro):
            ids = rows[i:i + micro].to(device)
            with autocast():
                th, tw = teacher_kd_targets(teacher, ids, "hidden")
                k, n = wrapper(heldout=(ids, th, tw))
                if ild:
                    loss, _ = wrapper(teacher_states(teacher, ids))
                    ild_sum += loss.float() * ids.shape[0]
            kl_sum += k.float()
            n_tok += n
    wrapper.train()
    kl_sum, n_tok, ild_sum = (acc.reduce(x, "sum") for x in (kl_sum, n_tok, ild_sum))
    if n_tok.item() == 0:
        return {}
    out = {kl_name(run): (kl_sum / n_tok).item()}
    if ild:  # mean over rows of the per-row-batch ILD loss
        out[f"eval/{run}/ild"] = (ild_sum / (n_tok / seq_len)).item()
    return out


def train_metrics(acc, run: str, *, loss: float, lr: float, grad_norm: float, tokens_per_s: float, tokens: int,
                  parts: dict) -> dict:
    """The step's metrics; `parts` (the loss's named terms, this process's) are averaged over processes. A part
    with one value per layer becomes one metric per layer. Collective."""
    tag = f"train/{run}"
    metrics = {f"{tag}/loss": loss, f"{tag}/lr": lr, f"{tag}/grad_norm": grad_norm,
               f"{tag}/tokens_per_s": tokens_per_s, f"{tag}/tokens": tokens}
    for k, v in parts.items():
        v = acc.reduce(v, "mean")
        if v.ndim == 0:
            metrics[f"{tag}/{k}"] = v.item()
        else:
            metrics.update({f"{tag}/{k}/{i}": x for i, x in enumerate(v.tolist())})
    return metrics


def best_so_far(eval_kl: list) -> tuple[int | None, float]:
    """(step, value) of the lowest held-out KL in [(step, value)], or (None, inf)."""
    return min(eval_kl, key=lambda e: e[1]) if eval_kl else (None, math.inf)


def is_diverging(value: float, best: float) -> bool:
    return value > DIVERGED * max(best, 1e-3)


def diverged_at_end(best_dir: Path, eval_kl: list, steps: int) -> dict | None:
    """At the end of a run: {best_step, best_kl, final_kl, best_dir} when the final held-out KL diverged from the
    best evaluation whose weights best_dir holds; None otherwise (or when there is no such evaluation)."""
    try:
        kept = json.loads((best_dir / "best.json").read_text())
    except (OSError, ValueError):
        return None
    final_kl = eval_kl[-1][1] if eval_kl and eval_kl[-1][0] == steps else None
    if final_kl is None or not is_diverging(final_kl, kept["eval_kl"]):
        return None
    return dict(best_step=kept["step"], best_kl=kept["eval_kl"], final_kl=final_kl, best_dir=str(best_dir))
