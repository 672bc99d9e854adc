#!/usr/bin/env bash
# Ran at commit c268de6 (run AL); the commit after it reverts the experiment.
# The W4A16 tiles with the next block's packed weights requested before the current block's dots, against the
# same kernel without (the parent commit's w4a16.py, placed at ab_tmp/w4a16_before.py by `git show HEAD~1:turbo/kernels/w4a16.py`): CUDA tests of the kernel,
# the M-bucket table's configs at M = 16, 32, 64 in CUDA graphs both ways, then the batch-32 and -64 rows.
source tests/gpu/common.sh
make_l7_config
cuda_tests 120 tests/turbo/kernels/test_w4a16_kernel.py
cp turbo/kernels/w4a16.py /tmp/w4a16_after.py
for v in before after; do
  if [ $v = before ]; then cp ab_tmp/w4a16_before.py turbo/kernels/w4a16.py; else cp /tmp/w4a16_after.py turbo/kernels/w4a16.py; fi
  timeout 100 python3 tests/gpu/w4a16_sweep.py $OUT/sweep_$v.json --m 16 32 64 --defaults > $OUT/sweep_$v.txt 2>&1 || echo "sweep $v rc=$?"
  echo "== $v"; grep "best config" $OUT/sweep_$v.txt
done
step "sweeps"
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
run b32_w4 $T --quant awq-w4g128 --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
run b64_w4_int8 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
step "rows"
cd $OUT && tar czf all.tgz *.json *.txt
