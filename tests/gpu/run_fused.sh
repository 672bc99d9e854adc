#!/usr/bin/env bash
# Device run I (issue 6): after run H's profile, one-launch split-K in the W4A16 kernel, the fused rotary
# kernel and the swept bucket configs.  Kernel and model tests on CUDA, the W4A16 table configs and the decode
# attention launch grid (CUDA-graph timed), and batch-1 decode with the kernel profile.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
LMC_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/kernels/test_fused_kernels.py tests/turbo/models tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py -x 2>&1 | tail -6 | tee $OUT/tests.txt
step "tests"
timeout 60 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json --defaults > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep -E "M=" $OUT/sweep.txt | grep -v best; tail -2 $OUT/sweep.txt | grep -i error
step "w4a16 table"
timeout 100 python3 tests/gpu/attention_sweep.py $OUT/attention.json > $OUT/attention.txt 2>&1 || echo "attention FAILED rc=$?"
grep None $OUT/attention.txt; tail -2 $OUT/attention.txt | grep -i error
step "attention"
run b1_w4 $T --quant awq-w4g128 --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256
run b1_w4_profile $T --quant awq-w4g128 --num-prompts 2 --concurrency 1 --input-len 128 --output-len 128 --profile
run b64_w4_int8 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
step "throughput"
cd $OUT && tar czf all.tgz *.json *.txt
