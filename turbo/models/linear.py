"""Linear layers: float weights, or 4-bit group-quantized weights kept packed.

QuantLinear holds the codes packed eight to an int32 (half a byte per weight,
so weight memory shows the 4-bit saving) and dequantizes on every call; this is
the CPU reference path.  Passing dequantize=True to make_linear trades that
memory for speed by dequantizing once at load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.errors import LmcError
from lmcompress.formats.packing import CODES_PER_INT32, pack_nibbles, unpack_nibbles
from lmcompress.quant.qtensor import QTensor


class FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("bias", bias)  # [out] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b for a 4-bit QTensor W."""

    def __init__(self, weight: QTensor, bias: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = weight.shape
        if weight.bits != 4 or in_features % CODES_PER_INT32:
            raise LmcError(
                f"turbo runs 4-bit weights with in_features divisible by 8, got {weight.bits} bits and "
                f"[{out_features}, {in_features}]; quantize with --bits 4 or load this linear in float"
            )
        self.group_size = weight.group_size
        self.register_buffer("qweight", pack_nibbles(weight.q))  # [out, in / 8] int32
        self.register_buffer("scales", weight.scales)  # [out, in / group_size]
        self.register_buffer("zeros", weight.zeros)  # [out, in / group_size] uint8 codes
        self.register_buffer("g_idx", weight.g_idx)  # [in] int32 group of each input channel, or None
        self.register_buffer("bias", bias)

    def qtensor(self) -> QTensor:
        return QTensor(unpack_nibbles(self.qweight), self.scales, self.zeros, 4, self.group_size, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qtensor().dequantize(x.dtype), self.bias)


def make_linear(weight: QTensor | torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                dequantize: bool = False) -> nn.Module:
    """A float weight becomes a FloatLinear in dtype; a QTensor a QuantLinear, or a FloatLinear if dequantize."""
    bias = None if bias is None else bias.to(dtype)
    if isinstance(weight, QTensor):
        if dequantize:
            return FloatLinear(weight.dequantize(dtype), bias)
        return QuantLinear(weight, bias)
    return FloatLinear(weight.to(dtype), bias)
