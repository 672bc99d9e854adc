"""Triton kernels for turbo's CUDA path; each has a plain PyTorch reference elsewhere in turbo.

The kernels need a CUDA device and the triton package; `available(device)`
says whether a tensor on `device` can take the kernel path.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

# The float32 2**23: a small unsigned code OR-ed into its mantissa reads as 2**23 + code, exactly, so the
# kernels turn codes into floats without an int-to-float conversion (quarter rate on sm_90).  Passed to the
# kernels as an argument: a LOP3 takes one immediate, and the code's mask is the other operand.
MAGIC_BITS = 0x4B000000


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available(device: torch.device | str) -> bool:
    """True when turbo should run its Triton kernels for tensors on `device` (called per layer: cheap)."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return device_type == "cuda" and _triton_installed()


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 for a CPU device (the Triton interpreter runs kernels on CPU tensors)."""
    if device.type != "cuda":
        return 1
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
