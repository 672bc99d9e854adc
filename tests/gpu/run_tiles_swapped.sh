#!/usr/bin/env bash
# Device runs L2 and L3 (issue 6): the W4A16 tiles with the operands swapped (out^T = W^T x^T: the dequantized weight
# is the left operand of Hopper's wgmma, held in registers, and x the right one, in shared memory; any M
# from 16 is a wgmma N; L3: the group scale folded into the weight or applied to a float32 partial).  The W4A16 and paged-attention tests on CUDA, then the tile sweep at M = 16, 32, 64.
source tests/gpu/common.sh
LMC_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -rf -p no:cacheprovider tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/kernels/test_paged_attention_kernel.py > $OUT/tests.txt 2>&1
tail -4 $OUT/tests.txt; grep -A30 "^___" $OUT/tests.txt | grep -E "Error|error|assert" | head -12
step "tests"
timeout 300 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json --m 16 32 64 > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep -E "None|best config" $OUT/sweep.txt; tail -2 $OUT/sweep.txt | grep -i error
step "sweep"
cd $OUT && tar czf all.tgz *.json *.txt
