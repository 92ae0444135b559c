"""Intervals for the numbers a sweep reports, from scipy: means over seeds, accuracies over samples, paired gaps.

Two sources of spread, two intervals:
- over seeds (the run-to-run spread a researcher cares about): a bootstrap of the mean over the per-seed
  values (scipy.stats.bootstrap, BCa, percentile where BCa is undefined);
- over evaluation samples within one seed (how well a finite evaluation pins one model's accuracy): the Wilson
  score interval of k correct out of n (scipy.stats.binomtest).
A paired comparison of two points over the same seeds bootstraps the mean of the per-seed differences.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED_CI = "bootstrap over seeds (BCa, 95%)"
SAMPLE_CI = "Wilson over evaluation samples (95%)"


def mean_ci(values, *, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Mean of per-seed values and its bootstrap interval: {mean, low, high, n}. One value has no interval
    (low = high = nan); equal values have a zero-width one."""
    x = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = len(x)
    if n == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": 1}
    if np.ptp(x) == 0:
        return {"mean": mean, "low": mean, "high": mean, "n": n}
    from scipy.stats import bootstrap

    with warnings.catch_warnings():  # BCa is undefined on very small or lopsided samples: percentile then
        warnings.simplefilter("ignore")
        res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES, method="BCa",
                        random_state=np.random.default_rng(seed))
        low, high = res.confidence_interval
        if not (np.isfinite(low) and np.isfinite(high)):
            res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES,
                            method="percentile", random_state=np.random.default_rng(seed))
            low, high = res.confidence_interval
    return {"mean": mean, "low": float(low), "high": float(high), "n": n}


def accuracy_ci(correct: int, total: int, *, confidence: float = CONFIDENCE) -> dict:
    """k correct of n evaluation samples -> {mean, low, high, n} with the Wilson score interval."""
    if total <= 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    from scipy.stats import binomtest

    ci = binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return {"mean": correct / total, "low": float(ci.low), "high": float(ci.high), "n": int(total)}


def samples_for_halfwidth(halfwidth: float, *, confidence: float = CONFIDENCE) -> int:
    """Evaluation samples for which the Wilson interval's half-width is at most `halfwidth` at every accuracy
    (the widest case, p = 0.5): 0.08 -> 143."""
    from scipy.stats import norm

    z = norm.ppf(0.5 + confidence / 2)
    n = 1
    while True:  # the Wilson half-width at p = 0.5 is z sqrt(n/4) / (n + z^2): decreasing in n
        if z * math.sqrt(n / 4) / (n + z * z) <= halfwidth:
            return n
        n += 1


def paired_difference(a, b, *, confidence: float = CONFIDENCE, seed: int = 0) -> dict:
    """Point A vs point B with seeds paired: a, b map seed -> value. The mean of the per-seed differences
    A - B and its bootstrap interval, over the seeds both have: {mean, low, high, n, seeds}."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    return dict(mean_ci(diffs, confidence=confidence, seed=seed), seeds=seeds)


def summarize(frame, by, metrics):
    """Long table of per-group statistics: one row per (group, metric) with mean, low, high, n and the interval's
    method. `frame` holds one row per (point, seed) run."""
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    rows = []
    groups = frame.groupby(by, dropna=False, sort=False) if by else [((), frame)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        for metric in metrics:
            if metric not in part:
                continue
            values = pd.to_numeric(part[metric], errors="coerce").tolist()
            rows.append({**dict(zip(by, key)), "metric": metric, **mean_ci(values), "ci": SEED_CI})
    return pd.DataFrame(rows, columns=[*by, "metric", "mean", "low", "high", "n", "ci"])
