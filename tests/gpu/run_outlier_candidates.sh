#!/usr/bin/env bash
# Issue 2's next step (written 2026-11-30, not yet run): reference-model candidates trained with other
# optimizer settings, each checked for salient activation channels (tests/gpu/activation_outliers.py; the
# committed model: 1.4-9.3x max / median) and for the share of RTN's W4 g128 gap that AWQ and GPTQ close on the
# whole held-out text, as docs/quantization.md measures it.  Carry [".whl", ".refdata"] (docs/reference-model.md
# says how .refdata is made).  Each argument is "NAME TRAIN-FLAGS...", e.g.
#   bash tests/gpu/run_outlier_candidates.sh "wd0.1 --weight-decay 0.1" "wd0 --weight-decay 0"
# About 4 minutes a candidate (120 s of training, as the committed model's 12-epoch candidate had).
source tests/gpu/common.sh
gunzip -kf .refdata/train.txt.gz
for variant in "$@"; do
  set -- $variant; name=$1; shift
  timeout 220 python3 -m lmcompress.reference.train --data .refdata --heldout tests/assets/ref-corpus/heldout.txt \
    --tokenizer tests/assets/ref-llama --out /tmp/$name --epochs 12 --max-seconds 120 "$@" > $OUT/$name.train.txt 2>&1 \
    || { echo "$name: training FAILED"; tail -3 $OUT/$name.train.txt; continue; }
  cp /tmp/$name/metrics.json $OUT/$name.metrics.json
  cp tests/assets/ref-llama/{tokenizer.json,tokenizer_config.json,chat_template.jinja} /tmp/$name/ref-llama/
  python3 tests/gpu/activation_outliers.py /tmp/$name/ref-llama --device cuda > $OUT/$name.outliers.txt 2>&1
  awk -v n=$name '$1 ~ /^[0-9]+$/ && $3 + 0 > m {m = $3 + 0} END {print n ": largest channel max / median " m}' $OUT/$name.outliers.txt
  for method in rtn awq gptq; do
    timeout 120 lmc quantize /tmp/$name/ref-llama /tmp/$name-$method --method $method --device cuda \
      --calib-data tests/assets/ref-corpus/calib.txt > /dev/null 2>&1 || echo "$name $method: quantize FAILED"
  done
  for model in /tmp/$name/ref-llama /tmp/$name-rtn /tmp/$name-awq /tmp/$name-gptq; do
    timeout 60 lmc eval ppl $model --data tests/assets/ref-corpus/heldout.txt --max-length 1024 --stride 1024 \
      --device cuda --json $OUT/$name.ppl.$(basename $model).json 2>&1 | tail -1 | sed "s|^|$name $(basename $model): |"
  done
  step "$name"
done
cd $OUT && tar czf all.tgz *.json *.txt
