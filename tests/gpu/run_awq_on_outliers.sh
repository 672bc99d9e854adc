#!/usr/bin/env bash
# Issue 2: which part of AWQ gains where a model has salient channels, e.g. the lr8 candidate of run AN (peak LR
# 8e-3; down_proj inputs up to 827x the median channel, q/k/v 9-29x; docs/quantization.md): the default AWQ, no
# clip, no up -> down scaling, AutoAWQ's clip grid, and GPTQ, calibration seeds 42 and 1, 128 x 512 tokens, for
# each model directory given (default the committed model).  A device call's 64 MiB has no room for a second
# model besides the tracked one: copy a candidate's files over tests/assets/ref-llama (uncommitted) and run it on
# the default.
source tests/gpu/common.sh
for model in "${@:-tests/assets/ref-llama}"; do
  name=$(basename $model)
  python3 tests/gpu/awq_variants.py $OUT/$name.json --model $model --seeds 42 1 \
    --only awq awq_no_clip awq_no_up_down_scaling awq_clip_autoawq_grid gptq > $OUT/$name.txt 2>&1 &
done
wait
step "variants"
grep -H "share" $OUT/*.txt | sed "s|$OUT/||"
