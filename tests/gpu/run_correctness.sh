#!/usr/bin/env bash
# Device run A: the turbo suite on CUDA and the reference model quantized with each method on the GPU.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
for d in turbo calib cli; do ln -sfn ../$d lmcompress/$d; done
# The quantize and eval commands alone: the server's dependencies (fastapi, uvicorn) are not on the GPU machine.
lmc_quantize() { python3 -c "from lmcompress.cli.quantize import quantize; quantize()" "$@"; }
lmc_eval() { python3 -c "from lmcompress.cli.evaluate import eval_group; eval_group()" "$@"; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/device.txt
python3 -c "import torch, transformers, datasets, pyarrow; print(torch.__version__, transformers.__version__, datasets.__version__, pyarrow.__version__)" | tee -a $OUT/device.txt
export PYTHONUNBUFFERED=1
LMC_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/turbo -k "not server" 2>&1 | tail -25 | tee $OUT/turbo_cuda.txt
for m in rtn awq gptq; do
  lmc_quantize tests/assets/ref-llama /tmp/ref-$m --method $m --device cuda --calib-data tests/assets/ref-corpus/calib.txt 2>&1 | tail -1 | tee -a $OUT/ref_quantize.txt
done
for d in tests/assets/ref-llama /tmp/ref-rtn /tmp/ref-awq /tmp/ref-gptq; do
  lmc_eval ppl $d --data tests/assets/ref-corpus/heldout.txt --max-length 1024 --stride 1024 --device cuda 2>&1 | tail -1 | tee -a $OUT/ref_ppl.txt
done
