#!/usr/bin/env bash
# The next device run for issue 6 (written 2026-11-29, not yet run): commit 3625414's decode attention split for
# batches too small to fill the GPU (run D's 8 programs an SM at 4 warps, 16 positions a tile).  CUDA tests of
# paged attention, the engine and CUDA graphs; `lmc bench kernels` (its 1 x 32768 and 16 x 4096 attention rows
# read 53-64 % of the copy bandwidth in run AE, 88-97 % in run D); the throughput rows, TTFT-512 and HF batch 64.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
cuda_tests 150 tests/turbo/kernels/test_paged_attention_kernel.py tests/turbo/test_engine.py tests/turbo/test_cuda_graph.py \
  tests/turbo/test_transfer.py
TMO=120 run kernels lmc bench kernels --device cuda
step "kernels"
throughput_rows
ttft512_row
step "rows"
hf_b64_row
step "hf"
cd $OUT && tar czf all.tgz *.json *.txt
