"""Where a benchmark's device time goes: torch.profiler over a run, summed per kernel.

`lmc bench throughput --profile PATH` wraps its timed run in `profiled(device)` and writes
`kernel_table(...)`: one row per kernel name (CUDA kernels on a GPU, including those replayed from
CUDA graphs; operators' own time on the CPU) with its calls, total time and share of all device time,
sorted by total.  This is the evidence behind docs/benchmarks.md's "what limits it" column: a target
missed by a kernel shows up as that kernel's share, one lost in Python as device time far below the
wall time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch.profiler import ProfilerActivity, profile

MAX_NAME = 96  # kernel names from templates run to kilobytes; the head names the kernel
_TEMPLATE_TAIL = re.compile(r"<.*")


@dataclass(frozen=True)
class KernelRow:
    name: str
    calls: int
    total_us: float
    mean_us: float
    share: float  # of all device time in the profile

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def profiled(device: torch.device) -> Iterator[profile]:
    """Profile the block: CUDA kernels on a CUDA device, CPU operators otherwise."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        yield prof
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def short_name(name: str) -> str:
    """A kernel's name without template arguments, at most MAX_NAME characters."""
    return _TEMPLATE_TAIL.sub("", name)[:MAX_NAME] or name[:MAX_NAME]


def kernel_table(prof: profile, device: torch.device) -> list[KernelRow]:
    """Device time per kernel (per operator's self time on the CPU), largest first."""
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        us = _device_us(event, device)
        if us is None:
            continue
        entry = totals.setdefault(short_name(event.name), [0, 0.0])
        entry[0] += 1
        entry[1] += us
    grand = sum(total for _, total in totals.values()) or 1.0
    rows = [KernelRow(name, calls, total, total / calls, total / grand) for name, (calls, total) in totals.items()]
    return sorted(rows, key=lambda row: row.total_us, reverse=True)


def _device_us(event, device: torch.device) -> float | None:
    """The event's kernel time on CUDA (kernel records only), or a CPU operator's self time."""
    if device.type == "cuda":
        on_device = event.device_type == torch.autograd.DeviceType.CUDA  # kernels, copies and memsets
        return event.time_range.elapsed_us() if on_device else None
    if event.device_type != torch.autograd.DeviceType.CPU or event.is_async:
        return None
    return event.self_cpu_time_total


def total_device_us(rows: list[KernelRow]) -> float:
    return sum(row.total_us for row in rows)
