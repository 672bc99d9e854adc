#!/usr/bin/env bash
# Device run AD (issue 6): where batch 64's decode step goes once the host is hidden (run AC: 6.59 ms of forward a
# step, GPU-bound).  The batch-64 W4 + int8 KV row profiled per kernel with LMC_PDL=0 (under PDL the profiler's
# kernel times include waiting), and the decode attention launch grid with fewer warps and smaller tiles.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
LMC_PDL=0 run b64_profile $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 64 --concurrency 64 --input-len 128 --output-len 128 --profile
step "profile"
timeout 300 python3 tests/gpu/attention_sweep.py $OUT/attention.json > $OUT/attention.txt 2>&1 || echo "sweep rc=$?"
step "attention sweep"
cd $OUT && tar czf all.tgz *.json *.txt
