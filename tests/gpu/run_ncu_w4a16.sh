#!/usr/bin/env bash
# Device run R (issue 6): Nsight Compute on the W4A16 kernel (the GEMV at M = 1, the tiles at M = 16 and 64) for
# the qkv and gate_up shapes: speed of light, occupancy, scheduler and warp-state statistics (stall reasons).
source tests/gpu/common.sh
NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"
for m in 1 16 64; do
  for shape in qkv gate_up; do
    timeout 90 $NCU --kernel-name regex:_w4a16_kernel --launch-skip 3 --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats \
      --section MemoryWorkloadAnalysis --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' python3 tests/gpu/ncu_w4a16.py $m $shape > $OUT/ncu_m${m}_$shape.txt 2>&1 || echo "ncu m=$m $shape FAILED rc=$?"
    grep -E "Duration|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|Issued Warp|No Eligible|Warp Cycles Per Issued|Block Limit Reg|Grid Size" $OUT/ncu_m${m}_$shape.txt | sed "s/^/m$m $shape: /" | head -14
    grep -E "issue_stalled" $OUT/ncu_m${m}_$shape.txt | sort -k3 -g -r | head -6 | sed "s/^/m$m $shape: /"
  done
done
step "ncu"
cd $OUT && tar czf all.tgz *.txt
