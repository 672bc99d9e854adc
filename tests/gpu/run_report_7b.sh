#!/usr/bin/env bash
# Device run F (issues 3 and 5): turbo's suite on CUDA (equivalence through kernels and decode graphs, KV
# perplexity), then `lmc report` on a Llama-2-7B-shaped checkpoint with dummy weights (memory columns).
source tests/gpu/common.sh
LMC_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider tests/turbo --ignore=tests/turbo/server --ignore=tests/turbo/kernels -k "not bench" 2>&1 | tail -12 | tee $OUT/turbo_cuda.txt
step "turbo suite on cuda"
python3 -m lmcompress.reference.dummy llama2-7b /tmp/l7 --tokenizer tests/assets/ref-llama --device cuda > /dev/null 2>&1
step "dummy checkpoint"
timeout 330 lmc report /tmp/l7 --methods fp16,rtn,awq,bnb-nf4,bnb-int8 --kv fp16,int8,int4 \
  --calib-data tests/assets/ref-corpus/calib.txt --calib-samples 32 --device cuda --out /tmp/report-7b \
  ${BENCH:+--bench-results $BENCH} 2>&1 | tr '\r' '\n' | grep -v '^lmc report:' | tail -30
step "report"
cp /tmp/report-7b/report.* $OUT/ 2>/dev/null
