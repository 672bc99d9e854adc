#!/usr/bin/env bash
# Device run AE (issue 6): the decode attention launch of run AD's sweep (16 positions a tile, fewer warps, 2
# programs an SM when sequences are split) with the overlapped engine of run AC.  CUDA tests of paged attention,
# CUDA graphs and generate() equivalence; the throughput rows, TTFT-512 and HF batch 64 in one run; then
# `lmc bench kernels` (its decode attention rows include batch 1 at 32k positions, which the sweep lacks).
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
cuda_tests 150 tests/turbo/kernels/test_paged_attention_kernel.py tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py
throughput_rows
ttft512_row
step "rows"
hf_b64_row
step "hf"
TMO=120 run kernels lmc bench kernels --device cuda
step "kernels"
cd $OUT && tar czf all.tgz *.json *.txt
