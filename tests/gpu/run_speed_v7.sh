#!/usr/bin/env bash
# Device run AA (issue 6): the GEMV reads x pre-scaled from a per-launch scratch (_prescale_x) and the decode
# kernels launch with PDL (run Z).  CUDA tests of the W4A16 kernel, PDL, CUDA graphs and generate() equivalence;
# every GEMV config at M = 1 and the table's configs at 16-64 in CUDA graphs; then the rows of
# docs/benchmarks.md: batch 1 (W4 and bf16), batch 32 (W4 and bf16), batch 64 W4 + int8 KV, TTFT-512, HF batch 64.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
cuda_tests 150 tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/kernels/test_pdl.py tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py
sweep sweep_gemv 100 --m 1 --gemv-only
sweep sweep_tiles 40 --m 16 32 64 --defaults
step "sweeps"
throughput_rows
ttft512_row
step "throughput"
hf_b64_row 150
step "hf"
cd $OUT && tar czf all.tgz *.json *.txt
