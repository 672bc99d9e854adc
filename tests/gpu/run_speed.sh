#!/usr/bin/env bash
# Device run E (issue 6): the W4A16 kernel's tests, `lmc bench kernels`, and every throughput target of
# issue 6 on Llama-2-7B shapes with dummy weights, plus HF generate() at batch 64, in one run.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/models/test_linear.py tests/turbo/test_cuda_graph.py 2>&1 | tail -15 | tee $OUT/w4_tests.txt
step "w4a16 tests"
timeout 90 lmc bench kernels --json $OUT/kernels.json > $OUT/kernels.txt 2>&1; tail -3 $OUT/kernels.txt
step "bench kernels"
throughput_rows
run b64_w4_bf16kv $T --quant awq-w4g128 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128
ttft512_row
step "throughput"
for kv in bfloat16 int8 int4; do
  run kvbound_$kv $T --quant awq-w4g128 --kv-cache-dtype $kv --kv-cache-memory 6GiB --num-prompts 128 --concurrency 128 --input-len 1024 --output-len 128
done
step "kv-bound"
TMO=90 run prefix32k lmc bench prefix $L7 --dummy --quant awq-w4g128 --dtype bfloat16 --device cuda --max-model-len 33280 --prefix-len 32768
step "prefix"
hf_b64_row
step "hf"
