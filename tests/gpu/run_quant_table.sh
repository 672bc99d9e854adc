#!/usr/bin/env bash
# Device run J (issue 2): the reference model's W4 g128 table in docs/quantization.md.  `lmc quantize` with each
# method and the ablation flags (128 x 512 calibration tokens of calib.txt, the defaults), then `lmc eval ppl`
# on the whole held-out text in disjoint 1024-token windows.  Then `lmc quantize --method awq --device cuda` on a
# Llama-2-7B-shaped checkpoint with dummy weights (time, peak GPU memory, sizes), unless REF_ONLY=1.
source tests/gpu/common.sh
quant() { name=$1; shift; timeout 120 lmc quantize tests/assets/ref-llama /tmp/ref-$name --device cuda --calib-data tests/assets/ref-corpus/calib.txt "$@" 2>&1 | tail -1 | sed "s/^/$name: /" | tee -a $OUT/ref_quantize.txt; }
quant rtn --method rtn
quant awq --method awq
quant gptq --method gptq
quant awq_range_search --method awq --range-search
quant gptq_no_range_search --method gptq --no-range-search
quant gptq_act_order --method gptq --act-order
step "quantize"
for d in tests/assets/ref-llama /tmp/ref-*; do
  timeout 60 lmc eval ppl $d --data tests/assets/ref-corpus/heldout.txt --max-length 1024 --stride 1024 --device cuda --json $OUT/ppl-$(basename $d).json 2>&1 | tail -1 | sed "s|^|$(basename $d): |" | tee -a $OUT/ref_ppl.txt
done
step "ref table"
[ -n "$REF_ONLY" ] || {
python3 -m lmcompress.reference.dummy llama2-7b /tmp/l7 --tokenizer tests/assets/ref-llama --device cuda > /dev/null 2>&1
timeout 240 lmc quantize /tmp/l7 /tmp/l7-awq --method awq --device cuda --calib-data tests/assets/ref-corpus/calib.txt 2>&1 | tr '\r' '\n' | tail -2 | tee $OUT/l7_awq.txt
step "all"
}
cd $OUT && tar czf all.tgz *.json *.txt
