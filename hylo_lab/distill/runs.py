"""One training run's pieces outside the loop: its state (Run), its outcome (RunResult), its seed, its batch
layout and optimizer, and activation checkpointing.

Batch layout: batch_size rows per optimizer step for all processes together = micro_batch_size rows per forward
per process x processes x accumulation steps. AdamW decays matrices (ndim >= 2) only; norms and biases not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.packing import PackedStream
from .stages import Recipe, RecipeError, StageSpec


class NonFiniteLoss(RuntimeError):
    """The loss (or gradient norm) became NaN / inf; the run stopped before the optimizer step."""


def set_activation_checkpointing(model, on: bool):
    """Recompute each decoder layer in backward (non-reentrant). transformers >= 5.2x names it activation_
    checkpointing_*, earlier 5.x gradient_checkpointing_*: use whichever the installed version has."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def run_seed(seed: int, *parts) -> int:
    """A stable per-run seed (Python's hash() of str is salted per process, so not that)."""
    import zlib

    return (seed * 1_000_003 + zlib.crc32("/".join(map(str, parts)).encode())) % (2**31 - 1)


def finished_result(run: str, final: Path) -> "RunResult":
    info = json.loads((final / "done.json").read_text()) if (final / "done.json").is_file() else {}
    return RunResult(run, final, steps=info.get("steps", 0), eval_kl=info.get("eval_kl", []),
                     diverged=info.get("diverged"))


@dataclass
class RunResult:
    name: str
    final_dir: Path | None  # None when the step budget stopped the run before its end
    steps: int = 0
    eval_kl: list = field(default_factory=list)  # [(step, value)]
    stopped: bool = False
    diverged: dict | None = None  # {best_step, best_kl, final_kl, best_dir} when the run ended diverged


@dataclass
class Run:
    """One training run in progress: what its loop reads and advances."""
    name: str
    stage: StageSpec
    dir: Path
    ild: bool
    teacher: nn.Module
    wrapper: nn.Module  # TeacherForcedStudent (ild) or KDStudent, prepared by the accelerator
    optimizer: torch.optim.Optimizer
    stream: PackedStream
    batch: int  # rows per optimizer step, all processes together
    micro: int  # rows per forward, per process
    accum: int  # micro-batches per optimizer step, per process
    steps: int
    use_ckpt: bool  # activation checkpointing
    result: RunResult
    step: int = 0
    tokens: int = 0


def batch_layout(recipe: Recipe, st: StageSpec, processes: int) -> tuple[int, int, int]:
        """(global batch rows, micro-batch rows per process, accumulation steps)."""
        bs, micro = recipe.stage_batch(st)
        n = processes
        if micro is None:
            if bs % n:
                raise RecipeError(f"stage {st.name}: batch_size={bs} does not split over {n} processes")
            micro = bs // n
        if bs % (micro * n):
            raise RecipeError(f"stage {st.name}: batch_size={bs} is not a multiple of micro_batch_size={micro} x "
                              f"{n} processes")
        return bs, micro, bs // (micro * n)


def adamw(wrapper: nn.Module, st: StageSpec, train) -> torch.optim.AdamW:
    """AdamW over the trainable parameters at the stage's lr; weight decay on matrices only."""
    params = [(n, p) for n, p in wrapper.named_parameters() if p.requires_grad]
    groups = [dict(params=[p for n, p in params if p.ndim >= 2], weight_decay=train.weight_decay),
              dict(params=[p for n, p in params if p.ndim < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=st.lr, betas=tuple(train.lr_betas), eps=train.eps)
