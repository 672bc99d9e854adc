#!/usr/bin/env bash
# Device run N (issue 2): `lmc quantize --method awq --device cuda` on the Llama-2-7B-shaped dummy checkpoint
# with the current AWQ defaults (GQA scaling, range clip on all seven linears), 128 x 512 calibration tokens:
# time, peak GPU memory and sizes, or the per-layer rate when the call's time runs out first.
source tests/gpu/common.sh
python3 -m lmcompress.reference.dummy llama2-7b /tmp/l7 --tokenizer tests/assets/ref-llama --device cuda > /dev/null 2>&1
step "dummy checkpoint"
timeout ${QTMO:-240} lmc quantize /tmp/l7 /tmp/l7-awq --method awq --device cuda --calib-data tests/assets/ref-corpus/calib.txt --calib-samples 128 --calib-seqlen 512 2>&1 | tr '\r' '\n' | grep -v "^$" > $OUT/l7_awq.txt
tail -4 $OUT/l7_awq.txt
step "quantize"
