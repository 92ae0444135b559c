"""The learning-rate schedule of every training loop here (distillation runs, toy teachers): linear warmup, cosine.

    lr(s) = lr (s + 1) / W                                                  s < W    (W warmup steps)
    lr(s) = lr (r + (1 - r) (1 + cos(pi (s - W) / max(1, S - W))) / 2)      s >= W   (S steps, r = min_ratio)
W = 0 starts on the cosine; the last step (S - 1) ends just above r lr. A function of the step alone, so a resumed
run continues the schedule exactly.
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total_steps` (see the module docstring)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
