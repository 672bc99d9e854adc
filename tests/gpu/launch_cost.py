"""Host time of eager launches, with and without programmatic dependent launch (device run AB -> AC).

Launches the fused RMSNorm kernel at a prompt step's shape (512 x 4096 bf16) N times without synchronizing,
inside and outside graph_launches() (PDL on and off), and prints the host microseconds per launch and the
device microseconds per launch (wall until synchronize).  Usage: python3 tests/gpu/launch_cost.py OUT.json
"""

from __future__ import annotations

import contextlib
import json
import sys
import time

import torch

from lmcompress.turbo.kernels.fused import rms_norm
from lmcompress.turbo.kernels.pdl import graph_launches

LAUNCHES = 2000


def per_launch_us(x: torch.Tensor, weight: torch.Tensor, pdl: bool) -> dict[str, float]:
    scope = graph_launches() if pdl else contextlib.nullcontext()
    with scope:
        rms_norm(x, weight, 1e-6)  # compile
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(LAUNCHES):
            rms_norm(x, weight, 1e-6)
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return {"host_us": 1e6 * host / LAUNCHES, "wall_us": 1e6 * wall / LAUNCHES}


def main(out: str) -> None:
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(4096, device="cuda", dtype=torch.bfloat16) + 0.5
    result = {}
    for round_ in range(2):  # twice each, alternating, so a drifting host shows
        for pdl in (False, True):
            result[f"pdl={pdl} round {round_}"] = per_launch_us(x, weight, pdl)
    for name, figures in result.items():
        print(f"{name}: host {figures['host_us']:.1f} us / launch, wall {figures['wall_us']:.1f} us / launch")
    json.dump(result, open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
