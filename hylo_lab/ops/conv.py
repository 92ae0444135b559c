"""Depthwise causal 1-D convolution with a carried tail: the short conv of GDN and Mamba2.

y_t[c] = act(bias[c] + sum_{w<W} weight[c, w] * x_{t-W+1+w}[c]), with x_s for s < 0 read from `state`,
the last W-1 inputs of the previous call (zeros at the start of a sequence). Feeding a sequence in pieces
and carrying the returned state equals one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d(x, weight, bias=None, *, state=None, activation=None):
    """x: [B, T, C]; weight: [C, W] (or nn.Conv1d's [C, 1, W]); bias: [C] | None; state: [B, C, W-1] | None.

    Returns y [B, T, C] in x's dtype and the new state [B, C, W-1] (the last W-1 inputs, x's dtype).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; choose one of {ACTIVATIONS}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    B, T, C = x.shape
    W = weight.shape[-1]
    if weight.shape[0] != C:
        raise ValueError(f"weight has {weight.shape[0]} channels but x has {C}")
    if state is None:
        state = x.new_zeros(B, C, W - 1)
    elif state.shape != (B, C, W - 1):
        raise ValueError(f"conv state has shape {tuple(state.shape)}, expected {(B, C, W - 1)}")
    if T == 1:
        return causal_conv1d_step(x, weight, bias, state=state, activation=activation)
    xp = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, W-1+T]
    y = F.conv1d(xp, weight.to(x.dtype).unsqueeze(1), None if bias is None else bias.to(x.dtype), groups=C)
    y = y.transpose(1, 2)
    if activation is not None:
        y = F.silu(y)
    return y, xp[..., xp.shape[-1] - (W - 1):].contiguous()


def causal_conv1d_step(x, weight, bias=None, *, state, activation=None):
    """One decode step: x [B, 1, C], state [B, C, W-1] -> (y [B, 1, C], new state [B, C, W-1])."""
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    window = torch.cat([state.to(x.dtype), x.transpose(1, 2)], dim=-1)  # [B, C, W]
    y = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        y = y + bias.to(x.dtype)
    if activation is not None:
        y = F.silu(y)
    return y.unsqueeze(1), window[..., 1:].contiguous()
