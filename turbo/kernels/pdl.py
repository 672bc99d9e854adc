"""Programmatic dependent launch (PDL, Hopper and later): a kernel launched with it may start while the kernel
before it in the stream is still finishing, and waits for that kernel's memory (griddepcontrol.wait) only where
it first reads what an earlier kernel wrote.

At batch 1 a decode step is a chain of ~10 small launches a layer, and every W4A16 linear paid a floor of
about 4.5 us (launch, ramp, split-K tail; docs/benchmarks.md).  With PDL each of turbo's decode kernels lets
the next one launch as soon as all of its own programs are running (allow_dependents), and the next one's
programs wait (wait_for_producers) before their first dependent load: the W4A16 GEMV issues its first weight
block's loads, which depend on no earlier kernel, before it waits.

Only inside `graph_launches()` (the CUDA-graph warm-up and capture of turbo's decode steps, cuda_graph.py): a
graph pays the launch cost once, while every eager launch with PDL costs the host more than without it (run AB:
a batch-1 prompt of 512 tokens, launched eagerly, took 38.2 ms to its first token with PDL and 20.9 without).

Safety: a kernel launched with PDL must wait before it reads or writes any memory an earlier kernel in the
stream may still read or write, and every program of it waits unconditionally, so that its completion implies
the completion of every kernel before it (the waits chain).  The one read before the wait, the GEMV's first
weight block, is of memory no kernel writes after load: PackedW4.from_qtensor synchronizes its stream once
the weights are packed.  `LMC_PDL=0` turns PDL off (every launch then waits for the whole previous kernel,
as without it).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import triton
import triton.language as tl


_graph_launches = False  # inside graph_launches()


@contextlib.contextmanager
def graph_launches() -> Iterator[None]:
    """Launches in this block go into CUDA graphs (or warm them up): pdl_launch may turn PDL on."""
    global _graph_launches
    outer, _graph_launches = _graph_launches, True
    try:
        yield
    finally:
        _graph_launches = outer


def pdl_launch(device: torch.device, wanted: bool = True) -> dict[str, bool]:
    """Launch keywords for a kernel that takes the PDL constexpr: its PDL and Triton's launch_pdl, both on
    when `wanted`, inside graph_launches() and pdl_enabled(device)."""
    on = wanted and _graph_launches and pdl_enabled(device)
    return {"PDL": on, "launch_pdl": on}


def pdl_enabled(device: torch.device) -> bool:
    """Launch turbo's decode kernels with PDL on `device`: a CUDA device of compute capability 9.0 or later,
    a triton that has the grid-dependency-control ops, and LMC_PDL not set to 0."""
    if device.type != "cuda" or os.environ.get("LMC_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(device_index: int) -> bool:
    has_ops = hasattr(getattr(tl.extra, "cuda", None), "gdc_wait")
    return has_ops and torch.cuda.get_device_capability(device_index)[0] >= 9


@triton.jit
def allow_dependents(PDL: tl.constexpr):
    """Let the next kernel in the stream launch once every program of this one has reached this point."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def wait_for_producers(PDL: tl.constexpr):
    """Block until the kernels before this one in the stream have finished and their writes are visible."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def enter_after_producers(PDL: tl.constexpr):
    """The start of a kernel that reads nothing before the kernels before it are done: let the next kernel
    launch, then wait."""
    allow_dependents(PDL)
    wait_for_producers(PDL)
