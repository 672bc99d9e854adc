"""Linear layers: float weights, or 4-bit group-quantized weights kept packed.

QuantLinear holds the codes packed eight to an int32 (half a byte per weight, so weight memory shows
the 4-bit saving).  Where turbo's kernels run it holds them in the W4A16 kernel's layout and multiplies
with w4a16_matmul; elsewhere it dequantizes on every call (the reference path).  Passing dequantize=True
to make_linear trades that memory for speed by dequantizing once at load.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.errors import LmcError
from lmcompress.formats.packing import CODES_PER_INT32, pack_nibbles, unpack_nibbles
from lmcompress.quant.qtensor import QTensor
from lmcompress.turbo import kernels

if TYPE_CHECKING:
    from lmcompress.turbo.kernels.w4a16 import PackedW4


class FloatLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)  # [out, in]
        self.register_buffer("bias", bias)  # [out] or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b for a 4-bit QTensor W.

    Buffers on the reference path: qweight [out, in/8] int32 (pack_nibbles along in_features), scales and
    zeros [out, in/g], g_idx.  Where kernels.available(device): the PackedW4 layout, qweight [in'/8, out],
    scales and zeros [in'/g, out], perm (see lmcompress.turbo.kernels.w4a16).
    """

    def __init__(self, weight: QTensor, bias: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        out_features, in_features = weight.shape
        if weight.bits != 4 or in_features % CODES_PER_INT32:
            raise LmcError(
                f"turbo runs 4-bit weights with in_features divisible by 8, got {weight.bits} bits and "
                f"[{out_features}, {in_features}]; quantize with --bits 4 or load this linear in float"
            )
        self.in_features, self.group_size, self.dtype = in_features, weight.group_size, dtype
        self.register_buffer("bias", bias)
        self.on_kernel = kernels.available(weight.q.device)
        if self.on_kernel:
            packed = _w4a16().PackedW4.from_qtensor(weight, dtype)
            tensors = {"qweight": packed.qweight, "scales": packed.scales, "zeros": packed.zeros, "perm": packed.perm}
        else:
            tensors = {"qweight": pack_nibbles(weight.q), "scales": weight.scales, "zeros": weight.zeros,
                       "g_idx": weight.g_idx}
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def packed(self) -> PackedW4:
        """The weight as a PackedW4 over this module's buffers (kernel path only)."""
        return _w4a16().PackedW4(self.qweight, self.scales, self.zeros, self.perm, self.in_features,
                                 self.group_size, self.dtype)

    def qtensor(self) -> QTensor:
        if self.on_kernel:
            return self.packed().to_qtensor()
        return QTensor(unpack_nibbles(self.qweight), self.scales, self.zeros, 4, self.group_size, self.g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_kernel:
            return _w4a16().w4a16_matmul(x, self.packed(), self.bias)
        return F.linear(x, self.qtensor().dequantize(x.dtype), self.bias)


def _w4a16():
    """The W4A16 kernel module, imported only where the kernels run (it imports triton)."""
    from lmcompress.turbo.kernels import w4a16

    return w4a16


def make_linear(weight: QTensor | torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                dequantize: bool = False) -> nn.Module:
    """A float weight becomes a FloatLinear in dtype; a QTensor a QuantLinear, or a FloatLinear if dequantize."""
    bias = None if bias is None else bias.to(dtype)
    if isinstance(weight, QTensor):
        if dequantize:
            return FloatLinear(weight.dequantize(dtype), bias)
        return QuantLinear(weight, bias, dtype)
    return FloatLinear(weight.to(dtype), bias)
