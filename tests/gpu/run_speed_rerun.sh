#!/usr/bin/env bash
# Device run G (issue 6): the W4A16 tests after the shared-memory fix of the M > 64 tiles, the CUDA KV
# perplexity test, and the runs of run_speed.sh that hit that bug (batch-1 W4, KV-bound, 32k prefix).
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda --quant awq-w4g128"
LMC_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/test_turbo_perplexity.py tests/turbo/test_llm_equivalence.py -k "not staggered" -s 2>&1 | grep -E 'ppl|passed|failed|FAILED' | tee $OUT/tests.txt
step "tests"
run b1_w4 $T --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256
for kv in bfloat16 int8 int4; do
  run kvbound_$kv $T --kv-cache-dtype $kv --kv-cache-memory 6GiB --num-prompts 128 --concurrency 128 --input-len 1024 --output-len 128
done
TMO=90 run prefix32k lmc bench prefix $L7 --dummy --quant awq-w4g128 --dtype bfloat16 --device cuda --max-model-len 33280 --prefix-len 32768
step "all"
cd $OUT && tar czf all.tgz *.json *.txt
