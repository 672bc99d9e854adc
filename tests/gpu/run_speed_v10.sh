#!/usr/bin/env bash
# Run for commit "graph-timed kernel bench" (2026-11-30): `lmc bench kernels` with decode-sized calls timed
# inside CUDA graphs (turbo/bench_kernels.py CudaGraphTimer) and its CUDA test, then the throughput rows with
# an overlapped pass's wall taken from the call that read it back (bench_throughput.pass_walls).
source tests/gpu/common.sh
make_l7_config
cuda_tests 120 tests/turbo/test_bench_kernels.py tests/turbo/test_bench_throughput.py
TMO=150 run kernels lmc bench kernels --device cuda
sed -n '/^linear/,/^One layer/p;/^paged_decode/,/^---*$/p' $OUT/kernels.txt | grep -E "m=1 |m=16 |m=64 |context=(512|32768)|us" | head -40
tail -12 $OUT/kernels.txt
step "kernels"
throughput_rows
step "rows"
cd $OUT && tar czf all.tgz *.json *.txt
