"""Paged decode attention launch settings at Llama-2-7B shapes (32 heads of 128, MHA), timed from one CUDA
graph of many launches, as a decode step runs them; block tables as wide as the engine's (max_model_len).

    python3 tests/gpu/attention_sweep.py OUT.json [--cases 1x192 1x32768] [--kv int8] [--block-n 16 32]
        [--partitions 8 16] [--warps 4] [--max-model-len 32768] [--flushed]

Per (batch, context, KV dtype): decode_launch's choice and a grid of (block_n, partitions, warps), in us per call
and as a share of the KV bytes at the copy bandwidth measured in the same run.  --flushed times each call after
an L2 flush (bench_kernels.CudaGraphTimer), as a decode step's layers find their KV; without it the calls
repeat on the same KV, which L2 may hold.
"""

from __future__ import annotations

import argparse
import json

import torch

from lmcompress.turbo.bench_kernels import CudaGraphTimer, cuda_timer, filled_kv_cache, measure_copy_gbps
from lmcompress.turbo.kernels.paged_attention import DecodeLaunch, paged_decode_attention
from lmcompress.turbo.kv_cache import KVCacheSpec

from graph_timing import graph_us  # this folder (the script's directory is on sys.path)

HEADS, HEAD_DIM, BLOCK_SIZE, CALLS, REPLAYS = 32, 128, 16, 32, 3
CASES = ["1x192", "32x192", "64x192", "64x1024", "128x1152"]
# Run I swept block_n 32/64 x partitions 1-16 at 4 warps; run AD adds fewer warps and smaller tiles, which hold
# fewer registers a thread (each of _attend_one's BLOCK_N rows keeps its own [D] accumulator) for more
# programs an SM.
BLOCK_NS, PARTITIONS, WARPS = (16, 32, 64), (1, 2, 4, 8), (1, 2, 4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cases", nargs="+", default=CASES, help="BATCHxCONTEXT")
    parser.add_argument("--kv", nargs="+", default=["bfloat16", "int8", "int4"])
    parser.add_argument("--block-n", type=int, nargs="+", default=BLOCK_NS)
    parser.add_argument("--partitions", type=int, nargs="+", default=PARTITIONS)
    parser.add_argument("--warps", type=int, nargs="+", default=WARPS)
    parser.add_argument("--max-model-len", type=int, default=4096, help="block table width, in tokens")
    parser.add_argument("--flushed", action="store_true")
    args = parser.parse_args()
    device = torch.device("cuda")
    copy_gbps = measure_copy_gbps(device, cuda_timer())
    flushed = CudaGraphTimer()
    rows = []
    for kv in args.kv:
        spec = KVCacheSpec(num_layers=1, num_kv_heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=kv)
        for batch, context in (map(int, case.split("x")) for case in args.cases):
            generator = torch.Generator(device=device).manual_seed(0)
            cache, tables = filled_kv_cache(spec, [context] * batch, device, generator, torch.bfloat16)
            wide = torch.zeros(batch, args.max_model_len // BLOCK_SIZE, dtype=torch.int32, device=device)
            wide[:, : tables.shape[1]] = tables
            query = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            kv_bytes = batch * context * spec.bytes_per_token()
            launches = [None] + [DecodeLaunch(block_n, partitions, warps, 1) for block_n in args.block_n
                                 for partitions in args.partitions for warps in args.warps]
            for launch in launches:
                try:
                    call = lambda: paged_decode_attention(query, cache.layers[0], wide, lens,  # noqa: E731
                                                          HEAD_DIM**-0.5, launch)
                    us = 1e3 * flushed(call) if args.flushed else graph_us([call] * CALLS, REPLAYS)
                except Exception as exc:
                    rows.append({"kv": kv, "batch": batch, "context": context, "launch": str(launch),
                                 "error": str(exc)[:200]})
                    continue
                share = kv_bytes / (copy_gbps * 1e3) / us
                rows.append({"kv": kv, "batch": batch, "context": context, "launch": str(launch), "us": us,
                             "copy_share": share})
                print(f"{kv:8s} b{batch:<4d} ctx {context:<5d} {us:8.2f} us  {100 * share:5.1f}% of copy  {launch}",
                      flush=True)
            del cache, tables, wide
            torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"copy_gbps": copy_gbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
