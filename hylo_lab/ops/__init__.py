"""Pure tensor functions, time-first [B, T, H, D]: pure-PyTorch references plus lazily imported GPU kernels."""

from hylo_lab.ops.conv import causal_conv1d, causal_conv1d_step
from hylo_lab.ops.dispatch import KernelUnavailableError, kernel_available, use_kernel
from hylo_lab.ops.gated_delta import (chunked_gated_delta_rule, gated_delta_rule, l2norm,
                                      recurrent_gated_delta_rule)
from hylo_lab.ops.ssd import chunked_ssd, recurrent_ssd, ssd

__all__ = [
    "KernelUnavailableError", "causal_conv1d", "causal_conv1d_step", "chunked_gated_delta_rule", "chunked_ssd",
    "gated_delta_rule", "kernel_available", "l2norm", "recurrent_gated_delta_rule", "recurrent_ssd", "ssd",
    "use_kernel",
]
