"""The one learning-rate schedule (distillation runs and toy teachers): hand-computed values at its corners."""
import math

import pytest

from hylo_lab.schedule import warmup_cosine


def lr(step, warmup=4, total=10, min_ratio=0.1):
    return warmup_cosine(step, lr=1.0, warmup_steps=warmup, total_steps=total, min_ratio=min_ratio)


def test_warmup_rises_linearly_to_the_peak():
    assert [lr(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr(4) == 1.0  # the cosine starts at its top


def test_cosine_falls_to_min_ratio():
    # 6 cosine steps: step 7 is halfway (progress 3/6), the last step (9) is 5/6 of the way down
    assert lr(7) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 6)))
    assert lr(10) == pytest.approx(0.1)


def test_no_warmup_starts_on_the_cosine_and_min_ratio_one_is_constant():
    assert lr(0, warmup=0) == 1.0 and lr(5, warmup=0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert {lr(s, min_ratio=1.0) for s in range(4, 10)} == {1.0}
