#!/usr/bin/env bash
# Device run M (issue 6): the throughput targets after runs L-L3 (tiles with the weight as wgmma's register
# operand, scale placement per bucket, GEMV planes 0-5 masked in place, chunked split sum) and the host-side
# step work.  CUDA tests of the W4A16 kernel, CUDA graphs and generate() equivalence first, then the W4A16
# table configs in CUDA graphs, the batch-1/32/64 and TTFT rows of docs/benchmarks.md, batch 64 with
# smaller prefill chunks (TTFT against throughput), the batch-1 kernel profile and HF batch 64.
source tests/gpu/common.sh
make_l7_config
T="lmc bench throughput $L7 --dummy --dtype bfloat16 --device cuda"
LMC_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -rf -p no:cacheprovider tests/turbo/kernels/test_w4a16_kernel.py tests/turbo/test_cuda_graph.py tests/turbo/test_llm_equivalence.py > $OUT/tests.txt 2>&1
tail -3 $OUT/tests.txt; grep -A30 "^___" $OUT/tests.txt | grep -E "Error|assert" | head -8
step "tests"
timeout 60 python3 tests/gpu/w4a16_sweep.py $OUT/sweep.json --m 1 16 32 64 --defaults > $OUT/sweep.txt 2>&1 || echo "sweep FAILED rc=$?"
grep -E "None|best config" $OUT/sweep.txt
step "w4a16 table"
throughput_rows
run ttft512 $T --quant awq-w4g128 --num-prompts 8 --concurrency 1 --input-len 512 --output-len 4
run b64_w4_int8_chunk2048 $T --quant awq-w4g128 --kv-cache-dtype int8 --num-prompts 256 --concurrency 64 --input-len 128 --output-len 128 --max-num-batched-tokens 2048
run b1_w4_profile $T --quant awq-w4g128 --num-prompts 2 --concurrency 1 --input-len 128 --output-len 128 --profile
step "throughput"
TMO=200 run hf_b64 lmc bench hf $L7 --dummy --batch-size 64 --input-len 128 --output-len 128 --cache static --dtype bf16 --device cuda
step "hf"
cd $OUT && tar czf all.tgz *.json *.txt
