#!/usr/bin/env bash
# Device run C (issue 6): every kernel's tolerance test, and turbo's CUDA equivalence suite through the
# kernels and the decode graphs.  (The benchmarks: run_bench_smoke.sh and run_speed.sh.)
source tests/gpu/common.sh
timeout 220 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels tests/turbo/test_cuda_graph.py 2>&1 | tail -30 | tee $OUT/kernel_tests.txt
step "kernel tests"
LMC_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/turbo --ignore=tests/turbo/server --ignore=tests/turbo/kernels 2>&1 | tail -30 | tee $OUT/turbo_cuda.txt
step "turbo suite on cuda"
