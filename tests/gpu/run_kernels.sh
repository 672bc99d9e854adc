#!/usr/bin/env bash
# Device run C (issue 6): every kernel's tolerance test, the CUDA equivalence suite through the kernels
# and decode graphs, `lmc bench kernels`, and a batch-1 decode smoke test on Llama-2-7B shapes.
source tests/gpu/common.sh
make_l7_config
t=$SECONDS
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels tests/turbo/test_cuda_graph.py 2>&1 | tail -30 | tee $OUT/kernel_tests.txt
echo "kernel tests: $((SECONDS-t)) s" | tee -a $OUT/times.txt; t=$SECONDS
LMC_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/turbo --ignore=tests/turbo/server --ignore=tests/turbo/kernels 2>&1 | tail -30 | tee $OUT/turbo_cuda.txt
echo "turbo suite on cuda: $((SECONDS-t)) s" | tee -a $OUT/times.txt; t=$SECONDS
timeout 120 lmc bench kernels --json $OUT/kernels.json 2>&1 | tail -80 | tee $OUT/kernels.txt
echo "bench kernels: $((SECONDS-t)) s" | tee -a $OUT/times.txt; t=$SECONDS
for q in awq-w4g128 none; do
  timeout 60 lmc bench throughput /tmp/l7cfg --dummy --quant $q --dtype bfloat16 --device cuda --num-prompts 2 --concurrency 1 \
    --input-len 128 --output-len 256 --max-model-len 4096 --json $OUT/b1_$q.json 2>&1 | tail -40 | tee $OUT/b1_$q.txt
done
echo "batch-1 smoke: $((SECONDS-t)) s" | tee -a $OUT/times.txt
