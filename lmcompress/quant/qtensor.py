"""The canonical quantized weight that every quantizer produces and every format packs.

Shapes follow nn.Linear: a weight is [out_features, in_features] and groups run
along in_features.  Integers are unsigned codes in [0, 2**bits); the zero point
is an unsigned code too (symmetric quantization fixes it at 2**(bits-1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.errors import LmcError

SUPPORTED_BITS = (4,)
SUPPORTED_GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    sym: bool = False  # False: asymmetric with a zero point (AWQ's and GPTQ's default for lmc)
    # Lowest zero code the output format can store.  GPTQ v1 stores zero - 1 in
    # 4 bits, so a zero of 0 would wrap to 15 and loaders (ExLlama, vLLM) would
    # read 16: the pipeline sets 1 for asymmetric GPTQ output.
    min_zero: int = 0

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise LmcError(f"--bits {self.bits} is not supported; use --bits 4")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise LmcError(
                f"--group-size {self.group_size} is not supported; use one of "
                + ", ".join(map(str, SUPPORTED_GROUP_SIZES))
            )

    @property
    def max_code(self) -> int:
        return 2**self.bits - 1

    def check_divides(self, name: str, in_features: int) -> None:
        if in_features % self.group_size:
            raise LmcError(
                f"group size {self.group_size} does not divide in_features {in_features} of {name}; "
                f"use a --group-size that divides it (32, 64 or 128)"
            )


@dataclass
class QTensor:
    """A group-quantized weight: w[o, i] ~= (q[o, i] - zeros[o, g(i)]) * scales[o, g(i)]."""

    q: torch.Tensor  # [out, in] uint8 codes in [0, 2**bits)
    scales: torch.Tensor  # [out, in // group_size] float
    zeros: torch.Tensor  # [out, in // group_size] uint8 codes
    bits: int
    group_size: int
    # [in] int32 group of each input channel; None means channel i is in group i // group_size.
    # GPTQ with act-order sets it (the groups follow the permuted order).
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def group_index(self) -> torch.Tensor:
        """[in] long: the group of each input channel."""
        if self.g_idx is not None:
            return self.g_idx.long()
        in_features = self.q.shape[1]
        return torch.arange(in_features, device=self.q.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] float weight."""
        groups = self.group_index()
        scales = self.scales.to(torch.float32)[:, groups]
        zeros = self.zeros.to(torch.float32)[:, groups]
        return ((self.q.to(torch.float32) - zeros) * scales).to(dtype)


def concat_out_features(parts: list[QTensor]) -> QTensor:
    """Stack weights that read the same input (q/k/v, gate/up) into one [sum(out), in] QTensor.

    The parts must share bits, group size and channel grouping (GPTQ's act-order
    derives g_idx from the shared input's Hessian, so siblings agree).
    """
    first = parts[0]
    for part in parts[1:]:
        same_groups = (part.g_idx is None and first.g_idx is None) or (
            part.g_idx is not None and first.g_idx is not None and torch.equal(part.g_idx, first.g_idx)
        )
        if (part.bits, part.group_size, part.shape[1]) != (first.bits, first.group_size, first.shape[1]) \
                or not same_groups:
            raise LmcError(
                "cannot stack quantized linears with different bits, group size, in_features or g_idx; "
                "load them as separate linears"
            )
    return QTensor(
        q=torch.cat([p.q for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]),
        bits=first.bits,
        group_size=first.group_size,
        g_idx=first.g_idx,
    )
