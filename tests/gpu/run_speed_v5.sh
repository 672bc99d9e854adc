#!/usr/bin/env bash
# Device run P (issues 6 and 2): speed_suite (tests/gpu/common.sh) after run O (tiles dequantizing in PTX; the
# M = 32 bucket on 8 warps), then the AWQ clip variants on the reference model.
source tests/gpu/common.sh
speed_suite
timeout 150 python3 tests/gpu/awq_variants.py $OUT/awq_variants.json --only awq awq_clip_2048_tokens awq_clip_all_tokens awq_clip_shrink_0.5 > $OUT/awq_variants.txt 2>&1 || echo "awq variants FAILED rc=$?"
grep ppl $OUT/awq_variants.txt
step "awq"
cd $OUT && tar czf all.tgz *.json *.txt
