"""One W4A16 launch per (M, shape) for Nsight Compute: warm-up calls first, then the launch to profile last.

    ncu --kernel-name _w4a16_kernel --launch-skip 3 --launch-count 1 --section ... \
        python3 tests/gpu/ncu_w4a16.py M SHAPE

SHAPE is a key of w4a16_sweep.SHAPES (Llama-2-7B's qkv, o, gate_up, down); bf16 activations, g128.
"""

from __future__ import annotations

import sys

import torch

from lmcompress.turbo.bench_kernels import random_qtensor
from lmcompress.turbo.kernels.w4a16 import PackedW4, w4a16_matmul

from w4a16_sweep import SHAPES  # this folder (the script's directory is on sys.path)


def main() -> None:
    m, (n, k) = int(sys.argv[1]), SHAPES[sys.argv[2]]
    device = torch.device("cuda")
    qt = random_qtensor(n, k, 128, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
    w = PackedW4.from_qtensor(qt, torch.bfloat16)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    for _ in range(4):  # three warm-ups (compile, caches), the fourth is profiled
        w4a16_matmul(x, w)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
