#!/usr/bin/env bash
# Device run M (issue 6): the throughput targets after runs L-L3 (tiles with the weight as wgmma's register
# operand, scale placement per bucket, GEMV planes 0-5 masked in place, chunked split sum) and the host-side
# step work: speed_suite (tests/gpu/common.sh).
source tests/gpu/common.sh
speed_suite
cd $OUT && tar czf all.tgz *.json *.txt
