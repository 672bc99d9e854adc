#!/usr/bin/env bash
# Device run AC (issue 6): the engine launching step N + 1 before reading step N's tokens (turbo/engine.py), and
# PDL only for CUDA-graph launches (run AB: eager prompt steps lost 17 ms with it).  CUDA tests of the engine,
# CUDA graphs, PDL and the W4A16 kernel; the host cost of an eager launch with and without PDL; the throughput
# rows and TTFT-512 with the overlap, the W4 rows again with LMC_OVERLAP=0, and HF batch 64, all in one run.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
cuda_tests 170 tests/turbo/kernels/test_pdl.py tests/turbo/test_engine.py tests/turbo/test_cuda_graph.py \
  tests/turbo/test_llm_equivalence.py tests/turbo/kernels/test_w4a16_kernel.py
timeout 60 python3 tests/gpu/launch_cost.py $OUT/launch_cost.json | tee $OUT/launch_cost.txt
step "launch cost"
mkdir -p $OUT/overlap1 $OUT/overlap0
OUT=$OUT/overlap1 throughput_rows
OUT=$OUT/overlap1 ttft512_row
step "overlap rows"
export LMC_OVERLAP=0
run overlap0/b1_w4 $T --quant awq-w4g128 --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256
run overlap0/b32_w4 $T --quant awq-w4g128 --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
run overlap0/b64_w4_int8 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
unset LMC_OVERLAP
step "no-overlap rows"
hf_b64_row
step "hf"
cd $OUT && tar czf all.tgz overlap*/ *.json *.txt
