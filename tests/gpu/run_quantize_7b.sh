#!/usr/bin/env bash
# Device run B: turbo's suite on CUDA, AWQ/GPTQ variants of the reference model, and
# `lmc quantize --device cuda` on a Llama-2-7B-shaped checkpoint with dummy weights.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
for d in turbo calib cli; do ln -sfn ../$d lmcompress/$d; done
lmc_quantize() { python3 -c "from lmcompress.cli.quantize import quantize; quantize()" "$@"; }
lmc_eval() { python3 -c "from lmcompress.cli.evaluate import eval_group; eval_group()" "$@"; }
export PYTHONUNBUFFERED=1
date -u | tee $OUT/date.txt
LMC_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider tests/turbo --ignore=tests/turbo/server 2>&1 | tail -15 | tee $OUT/turbo_cuda.txt
CALIB="--device cuda --calib-data tests/assets/ref-corpus/calib.txt"
variant() { name=$1; shift; lmc_quantize tests/assets/ref-llama /tmp/$name "$@" $CALIB 2>&1 | tail -1 >/dev/null;
  echo "$name $*: $(lmc_eval ppl /tmp/$name --data tests/assets/ref-corpus/heldout.txt --max-length 1024 --stride 1024 --device cuda 2>&1 | tail -1)" | tee -a $OUT/ref_variants.txt; }
variant awq-noclip --method awq --no-clip
variant awq-noduo --method awq --no-duo-scaling
variant gptq-actorder --method gptq --act-order
variant awq-256 --method awq --calib-samples 256
python3 -m lmcompress.reference.dummy llama2-7b /tmp/l7 --tokenizer tests/assets/ref-llama --device cuda
du -sh /tmp/l7 | tee $OUT/l7_size.txt
timeout 300 python3 -c "from lmcompress.cli.quantize import quantize; quantize()" /tmp/l7 /tmp/l7-awq --method awq $CALIB --calib-samples 128 --calib-seqlen 512 2>&1 | tr '\r' '\n' | tail -4 | tee $OUT/l7_awq.txt
