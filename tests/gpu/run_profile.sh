#!/usr/bin/env bash
# Device run H (issue 6): where the decode time goes.  The W4A16 launch-config sweep at 7B shapes
# (tests/gpu/w4a16_sweep.py, CUDA-graph timed), `lmc bench throughput --profile` at batch 1 (W4 and bf16) and
# batch 64 (W4 + int8 KV), and Nsight Compute on one batch-1 W4A16 launch where the machine allows it.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda --profile"
timeout 200 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json ${SWEEP_ARGS:---quick} > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep best $OUT/sweep.txt; tail -3 $OUT/sweep.txt
step "sweep"
run b1_w4 $T --quant awq-w4g128 --num-prompts 2 --concurrency 1 --input-len 128 --output-len 128
run b1_bf16 $T --quant none --num-prompts 2 --concurrency 1 --input-len 128 --output-len 128
run b64_w4_int8 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 64 --concurrency 64 --input-len 128 --output-len 128
step "profiles"
cat > /tmp/one_gemv.py <<'PY'
import torch
from lmcompress.turbo.bench_kernels import random_qtensor
from lmcompress.turbo.kernels.w4a16 import PackedW4, w4a16_matmul
d = torch.device("cuda")
w = PackedW4.from_qtensor(random_qtensor(12288, 4096, 128, torch.bfloat16, d, torch.Generator(device=d).manual_seed(0)), torch.bfloat16)
x = torch.randn(1, 4096, device=d, dtype=torch.bfloat16)
for _ in range(3):
    w4a16_matmul(x, w)
torch.cuda.synchronize()
PY
timeout 110 ncu --clock-control none -k regex:w4a16 -s 2 -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats python3 /tmp/one_gemv.py > $OUT/ncu.txt 2>&1 || echo "ncu rc=$?"
grep -E "Duration|Memory Throughput|DRAM Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Stall|Warp Cycles|Issued Warp|No Eligible|Block Limit|ERR|rror" $OUT/ncu.txt | head -40
step "ncu"
cd $OUT && tar czf all.tgz *.json *.txt
