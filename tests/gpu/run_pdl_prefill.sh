#!/usr/bin/env bash
# The next device run for issue 6 (written 2026-11-29, not yet run): does PDL cost prefill time?  Run AA's
# batch-32 W4 and TTFT-512 rows fell short of runs V and P by more than its other rows did.  The throughput rows
# (batch 1 and 32, W4 and bf16; batch 64 W4 + int8 KV) and TTFT-512 with PDL on, then with LMC_PDL=0, in one run.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
for pdl in 1 0; do
  export LMC_PDL=$pdl
  mkdir -p $OUT/pdl$pdl && OUT=$OUT/pdl$pdl throughput_rows
  OUT=$OUT/pdl$pdl ttft512_row
  step "pdl=$pdl"
done
cd $OUT && tar czf all.tgz pdl*/ *.txt
