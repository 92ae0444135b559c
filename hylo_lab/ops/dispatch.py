"""The one place that decides whether an op runs a GPU kernel package or its pure-PyTorch reference.

backend (config.kernel_backend):
  "torch"      never a kernel, never an import attempt;
  "auto"       the kernel when every tensor is on CUDA and the package imports (checked once per process);
  "fla"        force flash-linear-attention; "mamba_ssm" force mamba-ssm: a clear error when the package
               does not import or a tensor is not on CUDA. Forcing one package says nothing about the
               other: use_kernel("fla", "mamba_ssm", ...) is False.
Packages are imported only here and inside the ops' kernel branches, never at module level.
"""

from __future__ import annotations

import functools
import importlib

import torch

# The modules an op imports from each package; all of them must import for the package to count.
KERNEL_MODULES = {
    "fla": ("fla.ops.gated_delta_rule", "fla.ops.simple_gla"),
    "mamba_ssm": ("mamba_ssm.ops.triton.ssd_combined", "mamba_ssm.ops.triton.selective_state_update"),
}
BACKENDS = ("auto", "torch", *KERNEL_MODULES)


class KernelUnavailableError(RuntimeError):
    """A kernel package was forced (backend="fla" | "mamba_ssm") but cannot run here."""


@functools.lru_cache(maxsize=None)
def _import_error(pkg: str) -> str | None:
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
    return _import_error(pkg) is None


@functools.lru_cache(maxsize=None)
def fla_gated_backward_refused() -> str | None:
    """flash-linear-attention 0.6 refuses the backward of its gated chunk kernels (GDN, simple_gla) on Hopper
    with triton >= 3.4 and < 3.7.1 unless tilelang imports (environment.md). Returns the reason, or None."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return None
    try:
        import triton
        version = tuple(int(x) for x in triton.__version__.split("+")[0].split(".")[:3])
    except Exception:
        return None
    if not ((3, 4, 0) <= version < (3, 7, 1)):
        return None
    try:
        importlib.import_module("tilelang")
        return None
    except Exception:
        return f"triton {triton.__version__} on Hopper without tilelang: fla's gated chunk backward is refused"


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def use_fla_chunk(backend: str, *tensors) -> bool:
    """use_kernel("fla") for a chunked (T > 1) gated op, except when a backward will be needed and fla would
    refuse it on this GPU: then the PyTorch reference (forward and backward) runs instead, under "auto" only."""
    if not use_kernel("fla", backend, *tensors):
        return False
    if backend == "auto" and needs_grad(*tensors) and fla_gated_backward_refused():
        return False
    return True


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
        problems.append(f"it does not import ({_import_error(name)})")
    if problems:
        raise KernelUnavailableError(
            f"kernel_backend={backend!r} forces the {name!r} kernels, but " + "; and ".join(problems)
            + ". Use kernel_backend='torch' (pure PyTorch) or 'auto' (kernels only where they can run).")
    return True
