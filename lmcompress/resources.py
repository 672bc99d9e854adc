"""Device choice and peak-memory measurement for long-running jobs."""

from __future__ import annotations

import resource
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from lmcompress.errors import LmcError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LmcError(f"--device {name} was requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise LmcError(f"unknown --device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def max_rss_bytes() -> int:
    """This process's peak resident set size."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def tf32_matmuls(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 matmuls in TF32 (10-bit mantissa, like AutoAWQ's fp16 search but with
    float32 range) for the duration: the calibration forwards run ~8x faster on Ampere and later."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


class PeakMemory:
    """Peak GPU memory allocated by torch (on CUDA) or peak process RSS (on the CPU) over a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0
        self.kind = "gpu_allocated" if device.type == "cuda" else "process_rss"

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = max_rss_bytes()
