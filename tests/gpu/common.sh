# Sourced by the device scripts: wheels the GPU image lacks, the lmcompress.* layout, an `lmc` function.
# DEVICE=cpu (the scripts that take it) runs on this machine's install instead, e.g. `pip install -e .`.
set -o pipefail
export PYTHONUNBUFFERED=1
if [ "${DEVICE:-cuda}" != cpu ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/.bnb:$PWD
  for d in turbo calib cli; do ln -sfn ../$d lmcompress/$d; done
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -c "from lmcompress.cli.main import cli; cli()" "$@"\n' > /tmp/bin/lmc
  chmod +x /tmp/bin/lmc && export PATH=/tmp/bin:$PATH
fi
# A Llama-2-7B config with the reference tokenizer: what `--dummy` runs need (weights are made on the GPU).
L7=/tmp/l7cfg
make_l7_config() {
  mkdir -p $L7 && cp tests/assets/ref-llama/{tokenizer.json,tokenizer_config.json,chat_template.jinja} $L7/
  python3 -c "import json; from lmcompress.reference.dummy import LLAMA2_7B; json.dump(LLAMA2_7B, open('$L7/config.json','w'))"
}
# step NAME: log the seconds since the last step.  run NAME CMD...: run a bench command with --json under
# $OUT (timeout TMO, default 60 s) and print its headline rows and, when profiled, its kernel table.
t=$SECONDS
step() { echo "$1: $((SECONDS-t)) s" | tee -a $OUT/times.txt; t=$SECONDS; }
run() {
  name=$1; shift
  timeout ${TMO:-60} "$@" --json $OUT/$name.json > $OUT/$name.txt 2>&1 || { echo "$name FAILED rc=$?"; tail -3 $OUT/$name.txt; }
  grep -E "Output tok/s|Requests/s|TTFT p50|Decode steps|roofline|turn 1 / turn 2|turn . TTFT|KV cache" $OUT/$name.txt | sed "s|^|$name: |"
  sed -n '/Device time per kernel/,$p' $OUT/$name.txt | head -22
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/device.txt
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" | tee -a $OUT/device.txt
date -u | tee -a $OUT/device.txt
# The batch-1, batch-32 (W4 and bf16) and batch-64 W4 + int8 KV rows of docs/benchmarks.md.
throughput_rows() {
  T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
  for q in awq-w4g128 none; do
    run b1_$q $T --quant $q --num-prompts 3 --concurrency 1 --input-len 128 --output-len 256
    run b32_$q $T --quant $q --num-prompts 96 --concurrency 32 --input-len 128 --output-len 128
  done
  run b64_w4_int8 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
}
# Batch-1 TTFT of a 512-token prompt, W4 (needs $T), and HF generate() at batch 64 with a static cache (TMO 200 s).
ttft512_row() { run ttft512 $T --quant awq-w4g128 --num-prompts 8 --concurrency 1 --input-len 512 --output-len 4; }
hf_b64_row() {
  TMO=${1:-200} run hf_b64 lmc bench hf $L7 --dummy --batch-size 64 --input-len 128 --output-len 128 --cache static --dtype bf16 --device cuda
}
# The speed suite of runs M and P: CUDA tests of the W4A16 kernel, CUDA graphs and generate() equivalence, the
# W4A16 table configs in CUDA graphs, the throughput rows, TTFT-512, batch 64 with 2,048-token prefill chunks,
# the batch-1 kernel profile and HF batch 64 (the rows of docs/benchmarks.md).
speed_suite() {
  make_l7_config
  T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
  cuda_tests 150 tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py
  sweep sweep 60 --m 1 16 32 64 --defaults
  step "w4a16 table"
  throughput_rows
  ttft512_row
  run b64_w4_int8_chunk2048 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128 --max-num-batched-tokens 2048
  run b1_w4_profile $T --quant awq-w4g128 --num-prompts 2 --concurrency 1 --input-len 128 --output-len 128 --profile
  step "throughput"
  hf_b64_row
  step "hf"
}
# cuda_tests LIMIT FILES...: the given test files on CUDA into $OUT/tests.txt, printing the summary and failures.
cuda_tests() {
  limit=$1; shift
  LMC_TEST_DEVICE=cuda timeout $limit python3 -m pytest -q -rf -p no:cacheprovider "$@" > $OUT/tests.txt 2>&1
  tail -3 $OUT/tests.txt; grep -A30 "^___" $OUT/tests.txt | grep -E "Error|error|assert" | head -12
  step "tests"
}
# sweep NAME LIMIT ARGS...: tests/gpu/w4a16_sweep.py into $OUT/NAME.json and .txt, printing the table's rows and
# the best config per M.
sweep() {
  name=$1; limit=$2; shift 2
  timeout $limit python3 tests/gpu/w4a16_sweep.py $OUT/$name.json "$@" > $OUT/$name.txt 2>&1 || echo "$name FAILED rc=$?"
  grep -E "None|best config" $OUT/$name.txt; tail -2 $OUT/$name.txt | grep -i error
}
