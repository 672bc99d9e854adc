#!/usr/bin/env bash
# Decode attention for batches of 1-4 (MHA) at 32 positions a tile, 2 warps, 4 programs an SM (run AJ's grid):
# CUDA tests of the decode kernel and CUDA graphs; the new launch (None) against the old one (16 positions,
# 32 partitions, 4 warps) for bf16, int8 and int4 KV, L2 flushed; the batch-1 rows end to end.
source tests/gpu/common.sh
make_l7_config
cuda_tests 150 tests/turbo/kernels/test_paged_attention_kernel.py tests/turbo/test_cuda_graph.py
timeout 120 python3 tests/gpu/attention_sweep.py $OUT/attention_few.json --flushed --max-model-len 32768 \
  --cases 1x192 1x384 1x4096 1x32768 4x4096 --kv bfloat16 int8 int4 --block-n 16 --partitions 32 --warps 4 \
  > $OUT/attention_few.txt 2>&1 || echo "sweep rc=$?"
grep "of copy" $OUT/attention_few.txt
step "sweep"
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
for q in awq-w4g128 none; do run b1_$q $T --quant $q --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256; done
step "rows"
cd $OUT && tar czf all.tgz *.json *.txt
