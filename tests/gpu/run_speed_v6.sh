#!/usr/bin/env bash
# Device run V (issue 6): after run U (K = 32 tiles, buckets re-picked; the GEMV's x loads back to one plane at
# a time).  The W4A16 tests on CUDA, the table's configs in CUDA graphs, then batch 32 (W4 and bf16) and batch
# 64 W4 + int8 KV: the rows the tiles move (the last of this session's device time: no HF or batch-1 rows).
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
cuda_tests 80 tests/turbo/kernels/test_w4a16_kernel.py
sweep sweep 40 --m 1 16 32 64 --defaults
step "w4a16 table"
run b32_awq-w4g128 $T --quant awq-w4g128 --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
run b32_none $T --quant none --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
run b64_w4_int8 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
step "throughput"
cd $OUT && tar czf all.tgz *.json *.txt
