"""AutoAWQ's on-disk layouts: GEMM (what lmc writes) and GEMV (read only).

GEMM, per linear with out x in weight and g groups along in:
    qweight int32 [in, out/8]    codes packed along out, nibble i = column AWQ_ORDER[i] of each 8
    qzeros  int32 [in/g, out/8]  raw zero codes (no offset), packed like qweight
    scales  fp16  [in/g, out]
GEMV (AutoAWQ 0.2.9 WQLinear_GEMV), packed along in with the sequential order:
    qweight int32 [out, in/8]
    qzeros  int32 [out, W]       W >= ceil((in/g) / 8), padded (see WQLinear_GEMV's
                                 calculate_zeros_width); only the first in/g codes are used
    scales  fp16  [out, 8W]      first in/g columns used
Both dequantize as w = (q - z) * s.
"""

from __future__ import annotations

import torch

from lmcompress.errors import LmcError
from lmcompress.formats.packing import (
    CODES_PER_INT32,
    check_packable,
    check_shape,
    group_count,
    is_identity_groups,
    pack_nibbles,
    require_tensors,
    unpack_nibbles,
)
from lmcompress.quant.qtensor import QTensor, QuantConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
TENSOR_NAMES = ("qweight", "qzeros", "scales")


def pack(qt: QTensor, name: str = "linear") -> dict[str, torch.Tensor]:
    """The GEMM tensors of one linear, keyed qweight / qzeros / scales."""
    check_packable(qt, name, "AWQ")
    if qt.g_idx is not None and not is_identity_groups(qt.g_idx, qt.group_size):
        raise LmcError(
            f"{name} was quantized with act-order (a permuted g_idx), which the AWQ format cannot store; "
            "save with --format gptq or quantize without --act-order"
        )
    return {
        "qweight": pack_nibbles(qt.q.T.contiguous(), AWQ_ORDER),  # [in, out/8]
        "qzeros": pack_nibbles(qt.zeros.T, AWQ_ORDER),  # [in/g, out/8]
        "scales": qt.scales.T.to(torch.float16).contiguous(),  # [in/g, out]
    }


def unpack(tensors: dict[str, torch.Tensor], group_size: int, name: str = "linear") -> QTensor:
    """A QTensor from the GEMM tensors of one linear."""
    qweight, qzeros, scales = require_tensors(tensors, TENSOR_NAMES, name, "AWQ")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * CODES_PER_INT32
    n_groups = group_count(in_features, group_size, name)
    check_shape(name, "qzeros", qzeros, (n_groups, qweight.shape[1]))
    check_shape(name, "scales", scales, (n_groups, out_features))
    return QTensor(
        q=unpack_nibbles(qweight, AWQ_ORDER).T.contiguous(),  # [out, in]
        scales=scales.T.contiguous(),  # [out, in/g]
        zeros=unpack_nibbles(qzeros, AWQ_ORDER).T.contiguous(),  # [out, in/g]
        bits=4,
        group_size=group_size,
    )


def unpack_gemv(tensors: dict[str, torch.Tensor], group_size: int, name: str = "linear") -> QTensor:
    """A QTensor from the GEMV tensors of one linear (padding columns dropped)."""
    qweight, qzeros, scales = require_tensors(tensors, TENSOR_NAMES, name, "AWQ")
    out_features, in_features = qweight.shape[0], qweight.shape[1] * CODES_PER_INT32
    n_groups = group_count(in_features, group_size, name)
    if qzeros.dim() != 2 or qzeros.shape[0] != out_features or qzeros.shape[1] * CODES_PER_INT32 < n_groups:
        raise LmcError(
            f"{name}.qzeros has shape {list(qzeros.shape)} but GEMV needs [{out_features}, >= {-(-n_groups // 8)}] "
            f"for qweight {list(qweight.shape)} and group size {group_size}; the checkpoint is corrupt or its "
            "config.json group_size is wrong"
        )
    check_shape(name, "scales", scales, (out_features, qzeros.shape[1] * CODES_PER_INT32))
    return QTensor(
        q=unpack_nibbles(qweight),  # [out, in]
        scales=scales[:, :n_groups].contiguous(),
        zeros=unpack_nibbles(qzeros)[:, :n_groups].contiguous(),
        bits=4,
        group_size=group_size,
    )


def quantization_config(cfg: QuantConfig, modules_to_not_convert: list[str] | None = None) -> dict:
    """config.json's "quantization_config" for a GEMM checkpoint, as AutoAWQ writes it."""
    return {
        "quant_method": "awq",
        "version": "gemm",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "zero_point": True,
        "modules_to_not_convert": modules_to_not_convert,
    }

