"""On-disk 4-bit weight formats.

awq_gemm (AutoAWQ GEMM, written; GEMV, read) and gptq_v1 (GPTQ v1) pack and unpack
one linear's QTensor; registry maps --format names and declared layouts to them;
loader detects a checkpoint's format and reads it back (as QTensors, a float
state dict, or a float transformers model).
"""
