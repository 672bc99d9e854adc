#!/usr/bin/env bash
# Device run S (issue 6): run R's Nsight Compute found the GEMV at 20 % achieved occupancy with room for 12 blocks
# an SM (76 registers) and the M = 16 tiles at 21 % (long-scoreboard stalls first): the grid, not the registers,
# held the warps.  The sweep with more programs an SM (GEMV 8-24, tiles 2-8), then the throughput rows.
source tests/gpu/common.sh
timeout 330 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json --m 1 16 32 64 --quick > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep -E "None|best config" $OUT/sweep.txt; tail -2 $OUT/sweep.txt | grep -i error
step "sweep"
cd $OUT && tar czf all.tgz *.json *.txt
