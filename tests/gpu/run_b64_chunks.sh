#!/usr/bin/env bash
# Batch 64 (W4A16 + int8 KV, 256 x 128 in / 128 out) at prefill budgets of 8,192, 4,096 and 2,048 tokens a step,
# and HF generate() at batch 64 in the same run: the throughput, TTFT and HF-ratio targets side by side.
source tests/gpu/common.sh
make_l7_config
cuda_tests 90 tests/turbo/test_bench_kernels.py
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
B64="$T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128"
TMO=90 run b64_w4_int8 $B64
for budget in 4096 2048; do TMO=90 run b64_w4_int8_chunk$budget $B64 --max-num-batched-tokens $budget; done
step "b64"
hf_b64_row
step "hf"
cd $OUT && tar czf all.tgz *.json *.txt
