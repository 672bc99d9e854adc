#!/usr/bin/env bash
# Device run O (issues 6 and 2): the W4A16 tiles dequantizing in PTX (two code planes of two packed rows per
# prmt, one lop3 and one half2 fma per two weights: 3.1 instructions a weight at block_m 16 against 5.4,
# tests/gpu/sass_stats.py).  The W4A16 tests on CUDA (the new exactness test included), the config sweep at
# M = 1 (tiles against the GEMV), 16, 32, 64; then AWQ variants on the reference model (clip search on the
# second moments of all calibration tokens).
source tests/gpu/common.sh
cuda_tests 150 tests/turbo/kernels/test_w4a16_kernel.py
sweep sweep 330 --m 1 16 32 64 --no-gemv
step "sweep"
timeout 200 python3 tests/gpu/awq_variants.py $OUT/awq_variants.json > $OUT/awq_variants.txt 2>&1 || echo "awq variants FAILED rc=$?"
cat $OUT/awq_variants.txt | grep -v Warning | tail -9
step "awq"
cd $OUT && tar czf all.tgz *.json *.txt
