#!/usr/bin/env bash
# Device run D (issue 6): `lmc bench kernels` and batch-1 decode on Llama-2-7B shapes.
source tests/gpu/common.sh
make_l7_config
timeout 150 lmc bench kernels --json $OUT/kernels.json 2>&1 | tail -90 | tee $OUT/kernels.txt
step "bench kernels"
for q in awq-w4g128 none; do
  timeout 100 lmc bench throughput /tmp/l7cfg --dummy --quant $q --dtype bfloat16 --device cuda --num-prompts 2 --concurrency 1 \
    --input-len 128 --output-len 256 --max-model-len 4096 --json $OUT/b1_$q.json 2>&1 | tail -40 | tee $OUT/b1_$q.txt
done
step "batch-1"
