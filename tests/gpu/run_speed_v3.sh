#!/usr/bin/env bash
# Device run K (issue 6): the throughput targets after runs H-I (fused rotary, one-launch split-K GEMV, magic-
# number dequant in the W4A16 tiles, swept bucket configs).  Kernel tests first, then `lmc bench kernels`, the
# W4A16 table configs in CUDA graphs, the batch-1/32/64 and TTFT rows of docs/benchmarks.md and HF batch 64.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
LMC_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/kernels/test_fused_kernels.py 2>&1 | tail -4 | tee $OUT/tests.txt
step "kernel tests"
timeout 60 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json --defaults > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep -E "M=" $OUT/sweep.txt | grep -v best
timeout 90 lmc bench kernels --json $OUT/kernels.json > $OUT/kernels.txt 2>&1 || echo "bench kernels FAILED"
step "kernels"
throughput_rows
ttft512_row
step "throughput"
hf_b64_row
step "hf"
cd $OUT && tar czf all.tgz *.json *.txt
