"""Interval math against cases with a known answer."""

import math

import numpy as np
import pandas as pd
import pytest

from hylo_lab import stats


def test_mean_ci_matches_the_t_interval_on_a_large_normal_sample():
    # 400 draws: the bootstrap interval of the mean approaches mean +- t * s / sqrt(n)
    from scipy.stats import t

    x = np.random.default_rng(1).normal(3.0, 2.0, 400)
    got = stats.mean_ci(x)
    half = t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert got["n"] == 400 and got["mean"] == pytest.approx(x.mean())
    assert got["low"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert got["high"] == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_mean_ci_edge_cases():
    one = stats.mean_ci([0.7])
    assert one["mean"] == 0.7 and math.isnan(one["low"]) and one["n"] == 1
    same = stats.mean_ci([0.5, 0.5, 0.5])
    assert (same["low"], same["high"]) == (0.5, 0.5)
    assert stats.mean_ci([float("nan"), 1.0, 0.0])["n"] == 2
    assert stats.mean_ci([])["n"] == 0


def test_accuracy_ci_is_the_wilson_interval():
    # Wilson for 8 of 10 at 95%: centre (k + z^2/2) / (n + z^2), half-width z sqrt(p q n + z^2/4) / (n + z^2)
    z = 1.959963984540054
    k, n = 8, 10
    centre = (k + z * z / 2) / (n + z * z)
    half = z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    got = stats.accuracy_ci(k, n)
    assert got["mean"] == 0.8
    assert got["low"] == pytest.approx(centre - half, abs=1e-9)
    assert got["high"] == pytest.approx(centre + half, abs=1e-9)


def test_samples_for_halfwidth():
    n = stats.samples_for_halfwidth(0.08)
    assert stats.accuracy_ci(n // 2, n)["high"] - 0.5 <= 0.08 + 1e-9
    assert stats.accuracy_ci((n - 1) // 2, n - 1)["high"] - (n - 1) // 2 / (n - 1) > 0.08 - 1e-3
    assert n == 143


def test_paired_difference_uses_only_shared_seeds_and_pairs_them():
    # B = A - 0.1 on every seed: the paired gap is exactly 0.1 with a zero-width interval, although the
    # seeds themselves spread far more than 0.1 (an unpaired comparison could not separate them)
    a = {0: 0.2, 1: 0.9, 2: 0.5, 3: 0.7}
    b = {0: 0.1, 1: 0.8, 2: 0.4, 4: 0.0}
    got = stats.paired_difference(a, b)
    assert got["seeds"] == [0, 1, 2] and got["n"] == 3
    assert got["mean"] == pytest.approx(0.1) and got["low"] == pytest.approx(0.1) and got["high"] == pytest.approx(0.1)
    noisy = stats.paired_difference({s: 0.5 + 0.01 * s for s in range(8)}, {s: 0.4 + 0.02 * (s % 3) for s in range(8)})
    assert noisy["low"] < noisy["mean"] < noisy["high"] and noisy["low"] > 0


def test_summarize_groups_points_over_seeds():
    frame = pd.DataFrame({"layout": ["a"] * 3 + ["b"] * 3, "seed": [0, 1, 2] * 2,
                          "acc": [0.8, 0.9, 1.0, 0.1, 0.2, 0.3]})
    table = stats.summarize(frame, "layout", ["acc", "missing"])
    assert list(table.layout) == ["a", "b"] and list(table.n) == [3, 3]
    assert table["mean"].tolist() == pytest.approx([0.9, 0.2])
    assert (table.low < table["mean"]).all() and (table["mean"] < table.high).all()
    assert set(table.ci) == {stats.SEED_CI}
