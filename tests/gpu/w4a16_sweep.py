"""W4A16 launch configs at Llama-2-7B shapes, timed as a decode step runs them: many launches replayed from
one CUDA graph (no Python launch cost), over enough weight copies that none is read from L2.

    python3 tests/gpu/w4a16_sweep.py OUT.json [--m 1 16 64] [--quick | --defaults] [--gemv-only]

Prints per (M, shape, config): us per call, the share of the W4 roofline (weight bytes at the copy
bandwidth measured in this run), bf16 cuBLAS's us in the same way, and registers / spills of the kernel.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from lmcompress.turbo.bench_kernels import cuda_timer, measure_copy_gbps, random_qtensor, w4_weight_bytes
from lmcompress.turbo.kernels import w4a16
from lmcompress.turbo.kernels.w4a16 import PackedW4, TileConfig, w4a16_matmul

from graph_timing import graph_us  # this folder (the script's directory is on sys.path)

SHAPES = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}
FOOTPRINT = 512 * 2**20  # bytes of weight copies cycled through per replay: several times the L2
REPLAYS = 5


def gemv_configs(quick: bool) -> list[TileConfig]:
    if quick:
        columns, warps_options, pps_options = (2,), (2, 4), (8, 16, 24)
    else:
        columns, warps_options, pps_options = (1, 2, 4), (1, 2, 4, 8), (2, 4, 8, 16)
    return [TileConfig(1, 32 * per_thread * warps, warps, 1, pps)
            for per_thread in columns for warps in warps_options for pps in pps_options]


def tile_configs(m: int) -> list[TileConfig]:
    if m > 64:
        return large_tile_configs()
    bm = max(16, 1 << (m - 1).bit_length())  # M rounded up to a power of two, at least 16
    out = []
    for bn, warps in ((64, 4), (128, 4), (128, 8), (256, 4), (256, 8)):
        for pps in (2, 4, 8):
            for scale_in_weight in (False, True):
                out.append(TileConfig(bm, bn, warps, 3, pps, scale_in_weight))
    return out


def large_tile_configs() -> list[TileConfig]:
    """M > 64 (prefill chunks, large batches): tiles of 64 or 128 rows, the pipeline depth swept (x's [32, BM]
    slices dominate the shared memory there), the scale in the weight, one program an SM (no split-K)."""
    return [TileConfig(bm, bn, warps, stages, 1, True)
            for bm in (64, 128) for bn, warps in ((128, 4), (128, 8), (256, 8)) for stages in (2, 3, 4)]


def kernel_stats() -> dict:
    """Registers and spills of every compiled W4A16 kernel variant, by its constexprs and warps."""
    stats = {}
    for cache in getattr(w4a16._w4a16_kernel, "device_caches", {}).values():
        for kernel in cache[0].values():
            meta = kernel.metadata
            constants = getattr(meta, "constants", None) or {}
            key = str(sorted((str(k), str(v)) for k, v in dict(constants).items())) + f" w{meta.num_warps}"
            if hasattr(kernel, "_init_handles"):
                kernel._init_handles()  # registers and spills are read when the binary is loaded
            stats[key] = {"regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                          "shared": meta.shared}
    return stats


def best_config_per_m(rows: list[dict]) -> dict[int, tuple[str, float, float]]:
    """Per M, the config with the least time summed over all shapes (configs that failed on any shape are
    out): (config, summed us, summed bf16 us).  This is how the M-bucket table is chosen."""
    totals: dict[tuple[int, str], list[float]] = {}
    for row in rows:
        if "us" in row:
            totals.setdefault((row["m"], row["config"]), []).append((row["us"], row["bf16_us"]))
    best: dict[int, tuple[str, float, float]] = {}
    for (m, config), times in totals.items():
        if len(times) == len(SHAPES):
            us, bf16_us = sum(t for t, _ in times), sum(b for _, b in times)
            if m not in best or us < best[m][1]:
                best[m] = (config, us, bf16_us)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--quick", action="store_true", help="M = 1: only the GEMV configs around the table's "
                        "(2 columns a thread, 2-4 warps, 8-24 programs an SM)")
    parser.add_argument("--no-gemv", action="store_true", help="M = 1: only the tensor-core tiles (block_m 16)")
    parser.add_argument("--defaults", action="store_true", help="only the M-bucket table's configs")
    parser.add_argument("--gemv-only", action="store_true", help="M = 1: only the GEMV configs (no tiles)")
    args = parser.parse_args()
    device = torch.device("cuda")
    copy_gbps = measure_copy_gbps(device, cuda_timer())
    rows = []
    for name, (n, k) in SHAPES.items():
        qt = random_qtensor(n, k, 128, torch.bfloat16, device, torch.Generator(device=device).manual_seed(0))
        w4_bytes = w4_weight_bytes(n, k, 128, 2)
        copies = [PackedW4.from_qtensor(qt, torch.bfloat16) for _ in range(max(2, math.ceil(FOOTPRINT / w4_bytes)))]
        dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16)
                 for _ in range(max(2, math.ceil(FOOTPRINT / (2 * n * k))))]
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            bf16_us = graph_us([lambda d=d: F.linear(x, d) for d in dense], REPLAYS)
            roof_us = w4_bytes / (copy_gbps * 1e3)
            gemv = gemv_configs(args.quick) if m == 1 and not args.no_gemv else []
            tiles = [] if m == 1 and args.gemv_only else tile_configs(m)
            configs = [None] + ([] if args.defaults else tiles + gemv)
            for config in configs:
                try:
                    us = graph_us([lambda w=w: w4a16_matmul(x, w, None, config) for w in copies], REPLAYS)
                except Exception as exc:  # a config the compiler rejects (shared memory): recorded, not fatal
                    rows.append({"shape": name, "m": m, "config": str(config), "error": str(exc)[:200]})
                    continue
                rows.append({"shape": name, "m": m, "config": str(config), "us": us, "bf16_us": bf16_us,
                             "roofline_share": roof_us / us, "vs_bf16": bf16_us / us})
                print(f"{name:8s} M={m:<3d} {us:8.2f} us  roof {100 * roof_us / us:5.1f}%  bf16 {bf16_us:7.2f} us "
                      f"({bf16_us / us:4.2f}x)  {config}", flush=True)
            del x
        del copies, dense
        torch.cuda.empty_cache()
    best = {}
    for row in rows:
        if "us" in row:
            key = f"{row['shape']} M={row['m']}"
            if key not in best or row["us"] < best[key]["us"]:
                best[key] = row
    for key, row in best.items():
        print(f"best {key}: {row['us']:.2f} us, roof {100 * row['roofline_share']:.1f}%, "
              f"{row['vs_bf16']:.2f}x bf16, {row['config']}")
    for m, (config, us, bf16_us) in best_config_per_m(rows).items():
        print(f"best config M={m}: {us:.2f} us over the {len(SHAPES)} shapes ({bf16_us / us:.2f}x bf16), {config}")
    with open(args.out, "w") as f:
        json.dump({"copy_gbps": copy_gbps, "rows": rows, "best": best, "kernels": kernel_stats()}, f, indent=1)


if __name__ == "__main__":
    main()
