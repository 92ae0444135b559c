"""The one place that decides whether an op runs a GPU kernel package or its pure-PyTorch reference.

backend (config.kernel_backend):
  "torch"      never a kernel, never an import attempt;
  "auto"       the kernel when every tensor is on CUDA and the package imports (checked once per process);
  "fla"        force flash-linear-attention; "mamba_ssm" force mamba-ssm: a clear error when the package
               does not import or a tensor is not on CUDA. Forcing one package says nothing about the
               other: use_kernel("fla", "mamba_ssm", ...) is False.
Packages are imported only here and inside the ops' kernel branches, never at module level.

Per op the backward may still be refused where the forward runs (fla 0.6 on Hopper with triton < 3.7.1):
`fla_chunk_choice(ops, ...)` decides per op ("gated_delta"; "simple_gla" then "gla" for Mamba2's SSD), knows
which package fixes which refusal (BACKWARD_FIXED_BY), probes each kernel once, takes the first whose backward
runs, else the PyTorch path, and logs one line (logger "hylo_lab.ops") saying which path runs and how to get
the fast one.
"""

from __future__ import annotations

import functools
import importlib
import logging

import torch
import torch.nn.functional as F

# The modules an op imports from each package; all of them must import for the package to count.
KERNEL_MODULES = {
    "fla": ("fla.ops.gated_delta_rule", "fla.ops.simple_gla"),
    "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update"),
}
BACKENDS = ("auto", "torch", *KERNEL_MODULES)


class KernelUnavailableError(RuntimeError):
    """A kernel package was forced (backend="fla" | "mamba_ssm") but cannot run here."""


@functools.lru_cache(maxsize=None)
def import_error(pkg: str) -> str | None:
    """None when every module of `pkg` imports, else the first error as text. Cached: tried once."""
    for module in KERNEL_MODULES[pkg]:
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken triton raises RuntimeError, not only ImportError
            return f"{module}: {type(exc).__name__}: {exc}"
    return None


def kernel_available(pkg: str) -> bool:
    """Whether kernel package `pkg` ("fla" | "mamba_ssm") imports in this process (cached)."""
    if pkg not in KERNEL_MODULES:
        raise ValueError(f"unknown kernel package {pkg!r}; known: {', '.join(KERNEL_MODULES)}")
    return import_error(pkg) is None


# The fla chunk kernel behind each trainable op. fla 0.6 refuses the backward of the ops in BACKWARD_FIXED_BY on
# Hopper with triton >= 3.4, < 3.7.1 (its gated chunk_bwd_dqkwg) unless one of the listed packages imports
# (environment.md, measured: tilelang fixes the gated-delta backward, not simple_gla's). GLA's chunk backward has
# its own kernels, outside that refusal: Mamba2's SSD runs there as GLA with the head's gate on every key dim.
FLA_CHUNK_OPS = {"gated_delta": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                 "simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
                 "gla": ("fla.ops.gla", "chunk_gla")}
BACKWARD_FIXED_BY = {"gated_delta": ("tilelang",), "simple_gla": ()}
FAST_PATH_HINT = {"gated_delta": "install triton>=3.7.1, or tilelang (pip install 'hylo_lab[gpu]')",
                  "simple_gla": "install triton>=3.7.1 or mamba-ssm (tilelang does not fix simple_gla)",
                  "gla": "install triton>=3.7.1 or mamba-ssm"}
_log = logging.getLogger("hylo_lab.ops")
_announced: set = set()


def _triton_version() -> tuple | None:
    try:
        import triton
        return tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:3])
    except Exception:
        return None


def module_imports(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # tilelang without its z3 library raises OSError, not ImportError
        return False


@functools.lru_cache(maxsize=None)
def fla_backward_refused(op: str) -> str | None:
    """Known refusal of fla's chunk backward for `op` on this GPU and software stack, or None.

    fla 0.6 raises in the backward of its gated chunk kernels on Hopper with triton >= 3.4, < 3.7.1 unless a
    package in BACKWARD_FIXED_BY[op] imports. A rule from measurements; `backward_decision` also probes.
    """
    if op not in FLA_CHUNK_OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(FLA_CHUNK_OPS)}")
    if op not in BACKWARD_FIXED_BY or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    version = _triton_version()
    if version is None or not ((3, 4, 0) <= version < (3, 7, 1)):
        return None
    if any(module_imports(pkg) for pkg in BACKWARD_FIXED_BY[op]):
        return None
    fixed = " or ".join(BACKWARD_FIXED_BY[op]) or "no carried package"
    return f"fla's {op} chunk backward is refused on Hopper with triton {'.'.join(map(str, version))} ({fixed} fixes it)"


def _probe_backward(op: str, device: torch.device) -> str | None:
    """Run fla's chunk kernel for `op` forward + backward on 64 tiny tokens; the error as text, or None."""
    module, name = FLA_CHUNK_OPS[op]
    try:
        fn = getattr(importlib.import_module(module), name)
        q, k, v = (torch.randn(1, 64, 1, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = -torch.rand(1, 64, 1, *((64,) if op == "gla" else ()), device=device).requires_grad_()
        kw = dict(q=q, k=k, v=v, g=g)
        if op == "gated_delta":
            kw.update(k=F.normalize(k, dim=-1), beta=torch.rand(1, 64, 1, device=device, dtype=torch.bfloat16))
        o, _ = fn(**kw)
        o.float().sum().backward()
        if not all(torch.isfinite(t.grad).all() for t in (q, v)):
            return "non-finite gradients from the probe"
        return None
    except Exception as exc:  # the refusal is a RuntimeError raised inside backward
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


@functools.lru_cache(maxsize=None)
def backward_decision(op: str, device: str) -> str | None:
    """None when fla's chunk backward for `op` runs on `device`, else why not. Rule first, then one probe;
    cached per process, so the refusal is caught once and every later call takes the fallback directly."""
    return fla_backward_refused(op) or _probe_backward(op, torch.device(device))


def announce(op: str, what: str, path: str, why: str | None = None, instead_of: dict | None = None) -> None:
    """Say once per (op, what, path) which implementation runs, and how to get the fast one if not this
    (`why`); `instead_of` {op: reason} names preferred kernels that were refused."""
    if (op, what, path) in _announced:
        return
    _announced.add((op, what, path))
    if why is None:
        note = "; ".join(f"{o} refused: {w}" for o, w in (instead_of or {}).items())
        _log.info("%s %s: %s%s", op, what, path, f" ({note})" if note else "")
    else:
        _log.warning("%s %s: %s (%s); for the fast path: %s", op, what, path, why, FAST_PATH_HINT[op])


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def fla_chunk_choice(ops: tuple[str, ...], backend: str, *tensors) -> str | None:
    """Which of fla's chunk kernels `ops` (in order of preference) a chunked (T > 1) call runs, or None for the
    PyTorch path. use_kernel("fla") decides first; under "auto", when a backward will be needed, the first op
    whose fla backward runs here is taken (one line says which, and why the preferred one was not), and
    None (with a warning naming the fix) when none does, instead of a crash in backward. A forced "fla"
    keeps the first op (and its error)."""
    if not use_kernel("fla", backend, *tensors):
        return None
    if backend != "auto" or not needs_grad(*tensors):
        return ops[0]
    device = next(str(t.device) for t in tensors if isinstance(t, torch.Tensor))
    refused = {}
    for op in ops:
        why = backward_decision(op, device)
        if why is None:
            announce(ops[0], "backward", f"fla {op} kernel", None, refused)
            return op
        refused[op] = why
    announce(ops[0], "backward", "PyTorch chunked path", "; ".join(f"{o}: {w}" for o, w in refused.items()))
    return None


def use_fla_chunk(op: str, backend: str, *tensors) -> bool:
    """fla_chunk_choice for one op: whether its fla chunk kernel runs (see there)."""
    return fla_chunk_choice((op,), backend, *tensors) is not None


def _all_cuda(tensors) -> bool:
    return all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))


def use_kernel(name: str, backend: str, *tensors) -> bool:
    """Should an op run kernel package `name` ("fla" | "mamba_ssm") for these tensors under `backend`?"""
    if name not in KERNEL_MODULES:
        raise ValueError(f"unknown kernel package {name!r}; known: {', '.join(KERNEL_MODULES)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch" or (backend != "auto" and backend != name):
        return False
    if backend == "auto":
        return _all_cuda(tensors) and kernel_available(name)
    problems = []
    devices = sorted({str(t.device) for t in tensors if isinstance(t, torch.Tensor) and not t.is_cuda})
    if devices:
        problems.append(f"its kernels need CUDA tensors, got tensors on {', '.join(devices)}")
    if not kernel_available(name):
        problems.append(f"it does not import ({import_error(name)})")
    if problems:
        raise KernelUnavailableError(
            f"kernel_backend={backend!r} forces the {name!r} kernels, but " + "; and ".join(problems)
            + ". Use kernel_backend='torch' (pure PyTorch) or 'auto' (kernels only where they can run).")
    return True
