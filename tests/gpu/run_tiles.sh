#!/usr/bin/env bash
# Device run L (issue 6): the W4A16 tiles rewritten to dot one code plane (16 channels) at a time straight
# from the block's packed rows (no gather), scales applied once per group; the GEMV's last split loading its
# partials in chunks.  Every kernel and model test on CUDA first (also the review refactors since run K),
# then the config sweep at M = 1, 16, 32, 64 (CUDA-graph timed) and batch 1 / 32 decode.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
LMC_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels tests/turbo/models tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py 2>&1 | tail -8 | tee $OUT/tests.txt
step "tests"
timeout 300 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json --m 1 16 32 64 --quick > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep -E "None|best config" $OUT/sweep.txt; tail -2 $OUT/sweep.txt | grep -i error
step "sweep"
run b1_w4 $T --quant awq-w4g128 --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256
run b32_w4 $T --quant awq-w4g128 --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
run b32_bf16 $T --quant none --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
step "throughput"
cd $OUT && tar czf all.tgz *.json *.txt
