"""Gated delta rule (Gated DeltaNet's token mixer), time-first, with flash-linear-attention's semantics.

Per head, with the state S [K, V] (zeros unless given):
    S_t = exp(g_t) S_{t-1}
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T
    o_t = scale * S_t^T q_t                       scale defaults to K**-0.5
q, k: [B, T, H, K]; v: [B, T, H, V]; g (log decay, <= 0), beta: [B, T, H]. State [B, H, K, V].

`recurrent_gated_delta_rule` is the step-by-step reference (and the T=1 decode path);
`chunked_gated_delta_rule` is the WY/UT-transform chunked form for training and prefill (pure PyTorch);
`gated_delta_rule` dispatches to flash-linear-attention on CUDA (see ops/dispatch.py).
Everything accumulates in float32 (float64 when the inputs are float64); outputs take q's dtype.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from hylo_lab.ops.dispatch import use_fla_chunk, use_kernel

L2NORM_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + eps)


def l2norm(x, eps: float = L2NORM_EPS):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                     use_qk_l2norm=False, chunk_size=64, backend="auto"):
    """Dispatch: fla kernels on CUDA when allowed, else the chunked reference (T > 1) or one recurrent step.

    Returns o [B, T, H, V] (q's dtype) and the final state [B, H, K, V] in float32 (None unless
    output_final_state). backend "mamba_ssm" has no gated-delta kernel and behaves as "auto" here.
    T == 1 runs fla's fused_recurrent kernel (decode), T > 1 its chunk kernel; under "auto" a call that will
    need a backward fla refuses on this GPU (dispatch.fla_gated_backward_refused) takes the reference.
    """
    if backend == "mamba_ssm":
        backend = "auto"
    fla = use_kernel("fla", backend, q, k, v, g, beta) if q.shape[1] == 1 else use_fla_chunk(
        "gated_delta", backend, q, k, v, g, beta, initial_state)
    if fla:
        return _fla_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                     output_final_state=output_final_state, use_qk_l2norm=use_qk_l2norm)
    kwargs = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                  use_qk_l2norm=use_qk_l2norm)
    if q.shape[1] == 1:
        return recurrent_gated_delta_rule(q, k, v, g, beta, **kwargs)
    return chunked_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **kwargs)


def recurrent_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                               use_qk_l2norm=False):
    """Step-by-step reference. Same arguments and returns as `gated_delta_rule`."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    acc = _acc_dtype(q, k, v)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    out = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        kt = k[:, t]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))
        S = S + kt[..., :, None] * u[..., None, :]
        out.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) * scale)
    o = torch.stack(out, dim=1) if out else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def chunked_gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=True,
                             use_qk_l2norm=False, chunk_size=64):
    """Chunked (WY / UT transform) form; any T (padded to a chunk multiple inside). Same returns.

    In a chunk of length L with in-chunk cumulative log decay G_i and entry state S0, the pseudo-values
    u_i = beta_i (v_i - (decayed S_{i-1})^T k_i) solve the unit lower-triangular system
        (I + A) U = beta V - (beta e^G K) S0,   A_ij = beta_i e^{G_i - G_j} k_i.k_j  (j < i),
    so U = Uv - W S0 with [W | Uv] = (I + A)^{-1} [beta e^G K | beta V] (one triangular solve). Then
        O = scale ((Q e^G) S0 + (Q K^T o Gamma) U),   Gamma_ij = e^{G_i - G_j} (j <= i)
        S_L = e^{G_L} S0 + (K e^{G_L - G})^T U.
    Everything but the K x K state recurrence across chunks is a handful of matmuls batched over all chunks;
    the recurrence is one batched matmul-add per chunk (the only loop: T / chunk_size steps).
    Padding at the end uses g = 0, beta = 0, k = v = 0, which leaves the state untouched.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = q.dtype
    acc = _acc_dtype(q, k, v)
    scale = K ** -0.5 if scale is None else scale
    L = int(chunk_size)
    if L <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    q, k, v, g, beta = (t.to(acc) for t in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    pad = (-T) % L
    N = (T + pad) // L

    def chunks(x):  # [B, T, H, D] -> [B, H, N, L, D]; [B, T, H] -> [B, H, N, L]
        x = x.transpose(1, 2)
        x = F.pad(x, (0, 0, 0, pad)) if x.dim() == 4 else F.pad(x, (0, pad))
        return x.reshape(B, H, N, L, *x.shape[3:])

    q, k, v, g, beta = (chunks(t) for t in (q, k, v, g, beta))
    G = g.cumsum(-1)  # [B, H, N, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # [B, H, N, L, L]
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * gamma).tril(-1)
    rhs = torch.cat([(beta * G.exp())[..., None] * k, beta[..., None] * v], dim=-1)
    W, Uv = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True).split([K, V], dim=-1)
    P = (q @ k.transpose(-1, -2)) * gamma  # causal, diagonal included
    qg = q * G.exp()[..., None]
    kd = k * (G[..., -1:] - G).exp()[..., None]
    gL = G[..., -1].exp()  # [B, H, N]
    # S_{n+1} = M_n S_n + b_n with M_n = e^{G_L} I - (K e^{G_L - G})^T W, b_n = (K e^{G_L - G})^T Uv
    M = torch.diag_embed(gL[..., None].expand(*gL.shape, K)) - kd.transpose(-1, -2) @ W  # [B, H, N, K, K]
    b = kd.transpose(-1, -2) @ Uv  # [B, H, N, K, V]

    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(acc)
    entry = []  # the state entering each chunk; unbind, not indexing: one backward node, not N full-size zeros
    for M_n, b_n in zip(M.unbind(2), b.unbind(2)):
        entry.append(S)
        S = torch.baddbmm(b_n.flatten(0, 1), M_n.flatten(0, 1), S.flatten(0, 1)).view(B, H, K, V)
    S0 = torch.stack(entry, dim=2)  # [B, H, N, K, V]
    o = qg @ S0 + P @ (Uv - W @ S0)
    o = o.reshape(B, H, N * L, V)[:, :, :T] * scale
    return o.transpose(1, 2).to(out_dtype), (S if output_final_state else None)


@functools.lru_cache(maxsize=None)
def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _fla_gated_delta_rule(q, k, v, g, beta, *, scale, initial_state, output_final_state, use_qk_l2norm):
    """flash-linear-attention, keywords only (fused_recurrent's 5th positional argument is gk, not beta).

    The ops keep S as [N, H, K, V] unless state_v_first=True (what fla's layers use); we pin K-first.
    """
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    fn = fused_recurrent_gated_delta_rule if q.shape[1] == 1 else chunk_gated_delta_rule
    kwargs = dict(q=q, k=k, v=v, g=g.float(), beta=beta.to(q.dtype), scale=scale,
                  initial_state=None if initial_state is None else initial_state.float().contiguous(),
                  output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)
    if _accepts(fn, "state_v_first"):
        kwargs["state_v_first"] = False
    o, state = fn(**kwargs)
    return o.to(q.dtype), (None if state is None else state.float())
