#!/usr/bin/env bash
# GemLite's W4A16 kernels against turbo's and bf16 cuBLAS, CUDA-graph timed over rotated weight copies
# (tests/gpu/gemlite_compare.py; needs .whl/gemlite-*.whl, built with `pip wheel gemlite --no-deps -w .whl`).
source tests/gpu/common.sh
ps -eo pcpu,comm --sort=-pcpu | head -5 > $OUT/host_load.txt; nproc >> $OUT/host_load.txt
timeout 500 python3 tests/gpu/gemlite_compare.py $OUT/gemlite.json > $OUT/gemlite.txt 2>&1 || echo "gemlite_compare FAILED rc=$?"
grep -v Warning $OUT/gemlite.txt | tail -40
step "gemlite"
cd $OUT && tar czf all.tgz *.json *.txt
