"""Truncated SVD for low-rank initialisation (MLA's q_a/q_b and kv_a/kv_b factors, upcycle.py)."""

from __future__ import annotations

import math

import torch


def low_rank(W: torch.Tensor, rank: int):
    """Best rank-`rank` factorisation W ~ B @ A (Eckart-Young): A = S_r V_r^T [rank, in], B = U_r [out, rank],
    and all singular values S. Ranks above min(W.shape) are zero-padded (rows of A zero)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = min(rank, S.numel())
    A = W.new_zeros(rank, W.shape[1])
    B = W.new_zeros(W.shape[0], rank)
    A[:r] = S[:r, None] * Vh[:r]
    B[:, :r] = U[:, :r]
    return A, B, S


def energy_rank(S: torch.Tensor, energy: float, multiple: int = 8) -> int:
    """Smallest rank keeping `energy` of sum(S^2), rounded up to a multiple of `multiple`, capped at full rank."""
    e = S.double().pow(2)
    cum = e.cumsum(0) / e.sum().clamp_min(1e-300)
    r = int((cum < energy - 1e-12).sum().item()) + 1
    return min(S.numel(), round_up(r, multiple))


def kept_energy(S: torch.Tensor, rank: int) -> float:
    """Fraction of sum(S^2) in the first `rank` singular values."""
    e = S.double().pow(2)
    return float(e[:rank].sum() / e.sum().clamp_min(1e-300))


def round_up(x: float, m: int) -> int:
    """x rounded up to a multiple of m, at least m."""
    return max(m, int(math.ceil(x / m)) * m)
