"""turbo's W4A16 kernel against GemLite's (a Triton low-bit matmul library, `pip install gemlite`) and bf16
cuBLAS on Llama-2-7B's linears, each timed as the decode step runs them: inside a CUDA graph, over enough
copies of the weight that none is in L2 when it is read again (so the host's launch speed plays no part).

    python3 tests/gpu/gemlite_compare.py OUT.json [--m 1 16 64]

Prints one row per (linear, M): microseconds a call, % of the copy bandwidth on the W4 bytes, the ratio to
bf16 and the error against the dequantized weights in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

from lmcompress.turbo.bench_kernels import cuda_timer, measure_copy_gbps, random_qtensor, w4_weight_bytes
from lmcompress.turbo.kernels.pdl import graph_launches
from lmcompress.turbo.kernels.w4a16 import PackedW4, w4a16_matmul

from graph_timing import graph_us  # this folder (the script's directory is on sys.path)

SHAPES = [("qkv_proj", 12288, 4096), ("o_proj", 4096, 4096), ("gate_up_proj", 22016, 4096), ("down_proj", 4096, 11008)]
ROTATION_BYTES = 400e6  # weight copies per shape: their bytes exceed the L2 (50 MB) several times over
GROUP = 128
REPLAYS = 20
DTYPE = torch.bfloat16


def gemlite_linear(qt, n: int, k: int):
    from gemlite import DType, GemLiteLinear

    layer = GemLiteLinear(4, group_size=GROUP, in_features=k, out_features=n, input_dtype=DType.BF16,
                          output_dtype=DType.BF16)
    layer.pack(qt.q.contiguous(), qt.scales.to(DTYPE), qt.zeros.to(DTYPE), bias=None)
    return layer


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def compare_shape(name: str, n: int, k: int, ms: list[int], copy_gbps: float, gen: torch.Generator) -> list[dict]:
    w4_bytes = w4_weight_bytes(n, k, GROUP, 2)
    copies = max(2, math.ceil(ROTATION_BYTES / w4_bytes))
    dense_copies = max(2, math.ceil(ROTATION_BYTES / (n * k * 2)))
    qts = [random_qtensor(n, k, GROUP, DTYPE, torch.device("cuda"), gen) for _ in range(copies)]
    ours = [PackedW4.from_qtensor(qt, DTYPE) for qt in qts]
    start = time.perf_counter()
    gl = [gemlite_linear(qt, n, k) for qt in qts]
    pack_s = time.perf_counter() - start
    dense = [qts[i % copies].dequantize(DTYPE) for i in range(dense_copies)]
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=gen, device="cuda", dtype=DTYPE)
        ref = F.linear(x.float(), qts[0].dequantize(torch.float32))
        start = time.perf_counter()
        gl_out = gl[0](x)
        tune_s = time.perf_counter() - start
        row = {"shape": name, "m": m, "n": n, "k": k, "copies": copies, "gemlite_pack_s": pack_s,
               "gemlite_first_call_s": tune_s,
               "err_ours": rel_err(w4a16_matmul(x, ours[0]), ref), "err_gemlite": rel_err(gl_out, ref),
               "err_bf16": rel_err(F.linear(x, dense[0]), ref),
               "bf16_us": graph_us([lambda w=w: F.linear(x, w) for w in dense], REPLAYS),
               "ours_us": graph_us([lambda w=w: w4a16_matmul(x, w) for w in ours], REPLAYS),
               "gemlite_us": graph_us([lambda g=g: g(x) for g in gl], REPLAYS)}
        with graph_launches():
            row["ours_pdl_us"] = graph_us([lambda w=w: w4a16_matmul(x, w) for w in ours], REPLAYS)
        for impl in ("ours", "ours_pdl", "gemlite"):
            row[f"{impl}_copy_pct"] = 100 * w4_bytes / (row[f"{impl}_us"] * 1e-6) / (copy_gbps * 1e9)
            row[f"{impl}_speedup"] = row["bf16_us"] / row[f"{impl}_us"]
        rows.append(row)
        print(f"{name:13s} m={m:4d}  bf16 {row['bf16_us']:7.1f}  ours {row['ours_us']:7.1f} "
              f"({row['ours_copy_pct']:4.1f}%, {row['ours_speedup']:.2f}x)  ours+pdl {row['ours_pdl_us']:7.1f}  "
              f"gemlite {row['gemlite_us']:7.1f} ({row['gemlite_copy_pct']:4.1f}%, {row['gemlite_speedup']:.2f}x)  "
              f"err ours {row['err_ours']:.1e} gemlite {row['err_gemlite']:.1e} bf16 {row['err_bf16']:.1e}  "
              f"first gemlite call {tune_s:.1f} s", flush=True)
    del ours, gl, dense, qts
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256])
    args = parser.parse_args()
    import gemlite

    copy_gbps = measure_copy_gbps(torch.device("cuda"), cuda_timer())
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s; gemlite {gemlite.__version__}", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [row for name, n, k in SHAPES for row in compare_shape(name, n, k, args.m, copy_gbps, gen)]
    for m in args.m:
        layer = [r for r in rows if r["m"] == m]
        sums = {impl: sum(r[f"{impl}_us"] for r in layer) for impl in ("bf16", "ours", "ours_pdl", "gemlite")}
        print(f"layer m={m:4d}: " + "  ".join(f"{impl} {us:.1f}" for impl, us in sums.items()))
    json.dump({"device": torch.cuda.get_device_name(), "copy_gbps": copy_gbps, "rows": rows}, open(args.out, "w"),
              indent=1)


if __name__ == "__main__":
    sys.exit(main())
