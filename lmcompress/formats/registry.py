"""Which formats lmc writes and reads, and the packed tensor names of one linear."""

from __future__ import annotations

from typing import Callable

import torch

from lmcompress.errors import LmcError
from lmcompress.formats import awq_gemm, gptq_v1
from lmcompress.quant.qtensor import QTensor

# --format value -> packer of one linear
WRITERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "awq": awq_gemm.pack,
    "gptq": gptq_v1.pack,
}

# (quant_method, layout version) -> unpacker of one linear: (tensors, group_size, name) -> QTensor
READERS: dict[tuple[str, str], Callable[..., QTensor]] = {
    ("awq", "gemm"): awq_gemm.unpack,
    ("awq", "gemv"): awq_gemm.unpack_gemv,
    ("gptq", "gptq"): gptq_v1.unpack,
}

# Suffixes of the tensors that replace `<prefix>.weight` of a quantized linear, in any format.
PACKED_SUFFIXES = frozenset(awq_gemm.TENSOR_NAMES + gptq_v1.TENSOR_NAMES)


def tensors_for_linear(prefix: str, qt: QTensor, fmt: str) -> dict[str, torch.Tensor]:
    """{f"{prefix}.qweight": ..., ...}: what to save for one linear in format "awq" or "gptq" (bias not included)."""
    try:
        writer = WRITERS[fmt]
    except KeyError:
        raise LmcError(f"unknown output format {fmt!r}; use --format awq or --format gptq") from None
    return {f"{prefix}.{key}": tensor for key, tensor in writer(qt, name=prefix).items()}


def supported_readers() -> str:
    """E.g. "awq (gemm, gemv), gptq (gptq)", for error messages."""
    methods: dict[str, list[str]] = {}
    for method, version in READERS:
        methods.setdefault(method, []).append(version)
    return ", ".join(f"{method} ({', '.join(versions)})" for method, versions in methods.items())
