"""Paged decode attention launch settings at Llama-2-7B shapes (32 heads of 128, MHA), timed from one CUDA
graph of many launches, as a decode step runs them; block tables as wide as the engine's (max_model_len).

    python3 tests/gpu/attention_sweep.py OUT.json

Per (batch, context, KV dtype): decode_launch's choice and a grid of (block_n, partitions, warps), in us per call
and as a share of the KV bytes at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import sys

import torch

from lmcompress.turbo.bench_kernels import cuda_timer, filled_kv_cache, measure_copy_gbps
from lmcompress.turbo.kernels.paged_attention import DecodeLaunch, paged_decode_attention
from lmcompress.turbo.kv_cache import KVCacheSpec

from graph_timing import graph_us  # this folder (the script's directory is on sys.path)

HEADS, HEAD_DIM, BLOCK_SIZE, MAX_MODEL_LEN, CALLS, REPLAYS = 32, 128, 16, 4096, 32, 3
CASES = [(1, 192), (32, 192), (64, 192), (64, 1024), (128, 1152)]
# Run I swept block_n 32/64 x partitions 1-16 at 4 warps; run AD adds fewer warps and smaller tiles, which hold
# fewer registers a thread (each of _attend_one's BLOCK_N rows keeps its own [D] accumulator) for more
# programs an SM.
BLOCK_NS, PARTITIONS, WARPS = (16, 32, 64), (1, 2, 4, 8), (1, 2, 4)


def main() -> None:
    device = torch.device("cuda")
    copy_gbps = measure_copy_gbps(device, cuda_timer())
    rows = []
    for kv in ("bfloat16", "int8", "int4"):
        spec = KVCacheSpec(num_layers=1, num_kv_heads=HEADS, head_dim=HEAD_DIM, block_size=BLOCK_SIZE, dtype=kv)
        for batch, context in CASES:
            generator = torch.Generator(device=device).manual_seed(0)
            cache, tables = filled_kv_cache(spec, [context] * batch, device, generator, torch.bfloat16)
            wide = torch.zeros(batch, MAX_MODEL_LEN // BLOCK_SIZE, dtype=torch.int32, device=device)
            wide[:, : tables.shape[1]] = tables
            query = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
            lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            kv_bytes = batch * context * spec.bytes_per_token()
            launches = [None] + [DecodeLaunch(block_n, partitions, warps, 1) for block_n in BLOCK_NS
                                 for partitions in PARTITIONS for warps in WARPS]
            for launch in launches:
                try:
                    call = lambda: paged_decode_attention(query, cache.layers[0], wide, lens,  # noqa: E731
                                                          HEAD_DIM**-0.5, launch)
                    us = graph_us([call] * CALLS, REPLAYS)
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
    with open(sys.argv[1], "w") as f:
        json.dump({"copy_gbps": copy_gbps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
