#!/usr/bin/env bash
# Device run X (issue 2): AWQ knobs no flag reaches, each over three calibration seeds (42, 1, 2) so that a few
# points of sample noise are not taken for a gain (run W: the default gives 36.9 / 35.5 / 38.1 %).
source tests/gpu/common.sh
V="timeout 200 python3 tests/gpu/awq_variants.py"
$V $OUT/knobs.json --seeds 42 1 2 --only awq_clip_diagonal awq_shrunk_ranges awq_clip_then_shrunk_ranges \
  awq_two_stage awq_grid_40 > $OUT/knobs.txt 2>&1 || echo "knobs FAILED rc=$?"
grep ppl $OUT/knobs.txt; step "knobs"
$V $OUT/seq1024.json --seeds 42 1 2 --samples 64 --seqlen 1024 --only awq > $OUT/seq1024.txt 2>&1 || echo "seq1024 FAILED rc=$?"
grep ppl $OUT/seq1024.txt | sed "s/^/64 x 1024: /"; step "seq1024"
$V $OUT/range.json --seeds 42 1 2 --only awq_range_search_shrunk_ranges > $OUT/range.txt 2>&1 || echo "range FAILED rc=$?"
grep ppl $OUT/range.txt; step "range"
cd $OUT && tar czf all.tgz *.json *.txt
