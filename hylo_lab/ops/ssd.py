"""Mamba2's SSD as scalar-gated linear attention, time-first.

Per head, with the state [N, P] (zeros unless given):
    state_t = exp(dt_t A) state_{t-1} + B_t (dt_t x_t)^T
    y_t     = state_t^T C_t                          (no D skip: the layer adds D * x)
x: [B, T, H, P]; dt: [B, T, H] (already softplus'd, > 0); A: [H] (< 0); B, C: [B, T, H, N] (one group per
head). State [B, H, N, P]. This is linear attention with q = C, k = B, v = dt * x, log decay g = dt * A and
scale 1, which is how flash-linear-attention's simple_gla kernels can run it.

`recurrent_ssd` is the step-by-step reference (and the T=1 decode path); `chunked_ssd` the chunked form
(intra-chunk masked decay matrix + inter-chunk state passing); `ssd` dispatches to mamba-ssm, else fla,
on CUDA (see ops/dispatch.py). Accumulation in float32 (float64 for float64 inputs); y takes x's dtype.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from hylo_lab.ops.dispatch import fla_chunk_choice, use_kernel


def _acc_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ssd(x, dt, A, B, C, *, initial_state=None, output_final_state=True, chunk_size=64, backend="auto"):
    """Dispatch: mamba-ssm, then fla, on CUDA when allowed; else the chunked reference (T > 1) or one step.

    Returns y [B, T, H, P] (x's dtype) and the final state [B, H, N, P] in float32 (None unless
    output_final_state).
    """
    tensors = (x, dt, A, B, C)
    if use_kernel("mamba_ssm", backend, *tensors):
        return _mamba_ssm_ssd(x, dt, A, B, C, initial_state=initial_state,
                              output_final_state=output_final_state, chunk_size=chunk_size)
    if x.shape[1] == 1:
        fla = "simple_gla" if use_kernel("fla", backend, *tensors) else None
    else:
        fla = fla_chunk_choice(("simple_gla", "gla"), backend, *tensors, initial_state)
    if fla:
        return _fla_ssd(x, dt, A, B, C, initial_state=initial_state, output_final_state=output_final_state,
                        gated_keys=fla == "gla")
    if x.shape[1] == 1:
        return recurrent_ssd(x, dt, A, B, C, initial_state=initial_state, output_final_state=output_final_state)
    return chunked_ssd(x, dt, A, B, C, initial_state=initial_state, output_final_state=output_final_state,
                       chunk_size=chunk_size)


def recurrent_ssd(x, dt, A, B, C, *, initial_state=None, output_final_state=True):
    """Step-by-step reference. Same arguments and returns as `ssd`."""
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    out_dtype = x.dtype
    acc = _acc_dtype(x, B, C)
    x, dt, A, B, C = (t.to(acc) for t in (x, dt, A, B, C))
    S = x.new_zeros(Bsz, H, N, P) if initial_state is None else initial_state.to(acc)
    out = []
    for t in range(T):
        decay = (dt[:, t] * A).exp()[..., None, None]  # [B, H, 1, 1]
        S = decay * S + B[:, t, :, :, None] * (dt[:, t, :, None] * x[:, t])[:, :, None, :]
        out.append(torch.einsum("bhnp,bhn->bhp", S, C[:, t]))
    y = torch.stack(out, dim=1) if out else x.new_zeros(Bsz, 0, H, P)
    return y.to(out_dtype), (S if output_final_state else None)


def chunked_ssd(x, dt, A, B, C, *, initial_state=None, output_final_state=True, chunk_size=64):
    """Chunked form; any T (padded to a chunk multiple inside with dt = 0, a no-op step). Same returns.

    In a chunk with in-chunk cumulative log decay G (g = dt A) and entry state S0:
        Y   = (C B^T o Gamma) (dt x) + (C e^G) S0,     Gamma_ij = e^{G_i - G_j} (j <= i)
        S_L = e^{G_L} S0 + (B e^{G_L - G})^T (dt x).
    No loop: the states entering all chunks come at once from the per-chunk states and a [chunks x chunks]
    matrix of decays between chunk borders (one matmul), so the work is a few large batched matmuls.
    """
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    out_dtype = x.dtype
    acc = _acc_dtype(x, B, C)
    L = int(chunk_size)
    if L <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    x, dt, A, B, C = (t.to(acc) for t in (x, dt, A, B, C))
    pad = (-T) % L
    nc = (T + pad) // L

    def chunks(t):  # [B, T, H, D] -> [B, H, nc, L, D]; [B, T, H] -> [B, H, nc, L]
        t = t.transpose(1, 2)
        t = F.pad(t, (0, 0, 0, pad)) if t.dim() == 4 else F.pad(t, (0, pad))
        return t.reshape(Bsz, H, nc, L, *t.shape[3:])

    v = chunks(x * dt[..., None])
    g = chunks(dt * A)
    B, C = chunks(B), chunks(C)
    G = g.cumsum(-1)  # [B, H, nc, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    gamma = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    y = ((C @ B.transpose(-1, -2)) * gamma) @ v  # intra-chunk
    Cg = C * G.exp()[..., None]
    states = (B * (G[..., -1:] - G).exp()[..., None]).transpose(-1, -2) @ v  # [B, H, nc, N, P]: from zero
    # entering chunk n: sum_{m<n} e^{sum_{m<j<n} G_L,j} states_m + e^{sum_{j<n} G_L,j} S0, for n = 0 .. nc
    seg = _segment_sums(G[..., -1])  # [B, H, nc+1, nc+1]: seg[n, m] = sum_{m <= j < n} G_L,j
    decay = seg[..., 1:].masked_fill(~torch.ones(nc + 1, nc, dtype=torch.bool, device=x.device).tril(-1),
                                     float("-inf")).exp()  # [B, H, nc+1, nc]
    entry = (decay @ states.flatten(-2)).view(Bsz, H, nc + 1, N, P)
    if initial_state is not None:
        entry = entry + seg[..., 0].exp()[..., None, None] * initial_state.to(acc)[:, :, None]
    y = y + Cg @ entry[:, :, :nc]
    y = y.reshape(Bsz, H, nc * L, P)[:, :, :T].transpose(1, 2)
    return y.to(out_dtype), (entry[:, :, nc] if output_final_state else None)


def _segment_sums(g):
    """g [..., n] -> [..., n+1, n+1] with out[i, j] = sum_{j <= r < i} g_r (0 for j >= i).

    Summed directly over each range (reverse cumulative sums of the masked rows), not as a difference of
    two prefix sums, which loses precision once the total decay of a long sequence is large.
    """
    n = g.shape[-1]
    rows = g[..., None, :].expand(*g.shape[:-1], n + 1, n)
    rows = rows.masked_fill(~torch.ones(n + 1, n, dtype=torch.bool, device=g.device).tril(-1), 0)
    tail = rows.flip(-1).cumsum(-1).flip(-1)  # tail[i, j] = sum_{r >= j, r < i} g_r
    return F.pad(tail, (0, 1))


@functools.lru_cache(maxsize=None)
def _accepts(fn, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _mamba_ssm_ssd(x, dt, A, B, C, *, initial_state, output_final_state, chunk_size):
    """mamba-ssm keeps the state as [B, H, P, N]: transposed on the way in and out."""
    if x.shape[1] == 1:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update

        Bsz, _, H, P = x.shape
        N = B.shape[-1]
        S = (x.new_zeros(Bsz, H, N, P, dtype=torch.float32) if initial_state is None else initial_state.float())
        S = S.transpose(-1, -2).contiguous()  # [B, H, P, N], updated in place by the kernel
        y = selective_state_update(  # stride-0 expands of dt and A select the kernel's per-head path
            S, x[:, 0], dt[:, 0, :, None].expand(-1, -1, P), A.float()[:, None, None].expand(-1, P, N),
            B[:, 0], C[:, 0], D=None, z=None, dt_bias=None, dt_softplus=False)
        return y[:, None].to(x.dtype), (S.transpose(-1, -2) if output_final_state else None)
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    init = None if initial_state is None else initial_state.float().transpose(-1, -2).contiguous()
    res = mamba_chunk_scan_combined(x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size, D=None, z=None,
                                    dt_bias=None, initial_states=init, dt_softplus=False,
                                    return_final_states=output_final_state)
    if output_final_state:
        y, state = res
        return y.to(x.dtype), state.float().transpose(-1, -2)
    return res.to(x.dtype), None


def _fla_ssd(x, dt, A, B, C, *, initial_state, output_final_state, gated_keys=False):
    """fla's simple_gla with q = C, k = B, v = dt x, g = dt A, scale = 1 (its default is K**-0.5); state
    [B, H, K=N, V=P] unless state_v_first=True, which we pin off. Keywords only. gated_keys: fla's chunk_gla
    instead, the same recurrence with the head's log decay repeated over the N key dims."""
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    fn = fused_recurrent_simple_gla if x.shape[1] == 1 else chunk_simple_gla
    g = dt.float() * A.float()
    if gated_keys:
        from fla.ops.gla import chunk_gla as fn

        g = g[..., None].expand(*g.shape, B.shape[-1]).contiguous()
    v = (x.float() * dt.float()[..., None]).to(x.dtype)
    kwargs = dict(q=C.to(x.dtype), k=B.to(x.dtype), v=v, g=g, scale=1.0,
                  initial_state=None if initial_state is None else initial_state.float().contiguous(),
                  output_final_state=output_final_state)
    if _accepts(fn, "state_v_first"):
        kwargs["state_v_first"] = False
    y, state = fn(**kwargs)
    return y.to(x.dtype), (None if state is None else state.float())
