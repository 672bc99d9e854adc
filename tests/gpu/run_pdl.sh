#!/usr/bin/env bash
# Device run Z (issue 6): programmatic dependent launch (turbo/kernels/pdl.py).  CUDA tests of the kernels, CUDA
# graphs and generate() equivalence with PDL on; then PDL on against off (LMC_PDL=0) in one run: the W4A16
# table configs in CUDA graphs, batch-1 W4 decode, batch-64 W4 + int8 KV.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
cuda_tests 240 tests/turbo/kernels tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py
for pdl in 1 0; do
  export LMC_PDL=$pdl
  sweep sweep_pdl$pdl 90 --m 1 16 64 --defaults
  run b1_w4_pdl$pdl $T --quant awq-w4g128 --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256
  run b64_w4_int8_pdl$pdl $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
  step "pdl=$pdl"
done
export LMC_PDL=1
run b1_w4_profile $T --quant awq-w4g128 --num-prompts 2 --concurrency 1 --input-len 128 --output-len 128 --profile
step "profile"
cd $OUT && tar czf all.tgz *.json *.txt
