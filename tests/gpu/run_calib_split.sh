#!/usr/bin/env bash
# Device run W (issue 2): does the calibration text's split matter?  AWQ and GPTQ on the reference model with
# 128 x 512 calibration tokens drawn with three seeds from calib.txt (training documents, which the model saw
# 7.5 times) and from .refdata/valid.txt (the corpus's validation split, never trained on), which the run carries
# in (docs/reference-model.md says how .refdata is made).  SPLITS overrides the two files.
source tests/gpu/common.sh
for split in ${SPLITS:-tests/assets/ref-corpus/calib.txt .refdata/valid.txt}; do
  name=$(basename $split .txt)
  timeout 280 python3 tests/gpu/awq_variants.py $OUT/split_$name.json --calib $split --seeds 42 1 2 --only awq gptq \
    > $OUT/split_$name.txt 2>&1 || echo "$name FAILED rc=$?"
  sed "s/^/$name: /" $OUT/split_$name.txt | grep ppl
  step "$name"
done
cd $OUT && tar czf all.tgz *.json *.txt
