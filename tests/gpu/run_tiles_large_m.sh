#!/usr/bin/env bash
# Device run Y (issue 6): the fused W4A16 tiles at M = 128 and 256 (tests/gpu/w4a16_sweep.py's large-M configs)
# against bf16 cuBLAS in CUDA graphs: can they replace dequantize + cuBLAS (DEQUANT_GEMM_MIN_M) where the
# target asks for no worse than 1.2x bf16 at M = 256?
source tests/gpu/common.sh
sweep sweep_large 420 --m 128 256
step "sweep"
cd $OUT && tar czf all.tgz *.json *.txt
