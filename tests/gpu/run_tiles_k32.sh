#!/usr/bin/env bash
# Device run U (issue 6): PackedW4's bytes hold neighbouring channels (byte i of row r: channels 32i + 2r, +1), so
# the tiles dot K = 32 a step with one x load per byte (5.0 against 6.1 SASS instructions a weight at block_m
# 32-64, 3.5 against 3.1 at 16).  The W4A16 tests on CUDA (the exactness test included), then the config
# sweep at M = 16, 32, 64 and the table's configs at M = 1.
source tests/gpu/common.sh
cuda_tests 120 tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/models/test_linear.py
sweep sweep 200 --m 16 32 64
sweep sweep_m1 60 --m 1 --defaults
step "sweep"
cd $OUT && tar czf all.tgz *.json *.txt
