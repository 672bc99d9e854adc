"""Bit packing and checks shared by the 4-bit on-disk formats.

Every AWQ and GPTQ layout stores eight 4-bit codes per int32: nibble i (bits
4i..4i+3) holds column order[i] of its run of eight consecutive columns.  AutoAWQ
GEMM uses the order (0, 2, 4, 6, 1, 3, 5, 7), which its CUDA kernel dequantizes
cheaply; GPTQ and AutoAWQ GEMV use the identity order.
"""

from __future__ import annotations

import torch

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QTensor

CODES_PER_INT32 = 8
SEQUENTIAL_ORDER = tuple(range(CODES_PER_INT32))


def pack_nibbles(codes: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """codes [..., n] integers in [0, 16) -> [..., n/8] int32, packed along the last dim."""
    runs = codes.reshape(*codes.shape[:-1], -1, CODES_PER_INT32)  # [..., n/8, 8]
    # Accumulate in int64, one nibble at a time (bounded memory for 70B-sized linears).
    packed = torch.zeros(runs.shape[:-1], dtype=torch.int64, device=codes.device)
    for nibble, column in enumerate(order):
        packed |= runs[..., column].to(torch.int64) << (4 * nibble)
    # Reinterpret as signed int32 (the stored dtype): values >= 2**31 wrap to negatives.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_nibbles(packed: torch.Tensor, order: tuple[int, ...] = SEQUENTIAL_ORDER) -> torch.Tensor:
    """[..., m] int32 -> [..., 8m] uint8 codes; the inverse of pack_nibbles."""
    columns = torch.empty(*packed.shape, CODES_PER_INT32, dtype=torch.uint8, device=packed.device)
    for nibble, column in enumerate(order):
        # An arithmetic shift of a negative int32 fills the top bits with ones; the mask drops them.
        columns[..., column] = (packed >> (4 * nibble)) & 0xF
    return columns.reshape(*packed.shape[:-1], -1)


def identity_groups(in_features: int, group_size: int, device: torch.device | None = None) -> torch.Tensor:
    """[in] int32: channel i in group i // group_size (no act-order)."""
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def is_identity_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    return torch.equal(g_idx.to(torch.int32), identity_groups(g_idx.numel(), group_size, g_idx.device))


def check_packable(qt: QTensor, name: str, fmt: str) -> None:
    """Raise LmcError unless qt is a consistent 4-bit QTensor whose dims fit 8-code int32 packing."""
    out_features, in_features = qt.shape
    if qt.bits != 4:
        raise LmcError(f"{name} is quantized to {qt.bits} bits but the {fmt} format stores 4; quantize with --bits 4")
    if out_features % CODES_PER_INT32 or in_features % CODES_PER_INT32:
        raise LmcError(
            f"{name} has shape [{out_features}, {in_features}]; the {fmt} format needs both dims divisible by 8; "
            "leave this module unquantized"
        )
    n_groups = qt.scales.shape[1]
    if qt.g_idx is None and in_features != n_groups * qt.group_size:
        raise LmcError(
            f"{name}: group size {qt.group_size} does not divide in_features {in_features} into {n_groups} groups; "
            "use a --group-size that divides in_features"
        )
    expected = (out_features, n_groups)
    if tuple(qt.scales.shape) != expected or tuple(qt.zeros.shape) != expected:
        raise LmcError(
            f"{name}: scales {list(qt.scales.shape)} and zeros {list(qt.zeros.shape)} must both be {list(expected)}; "
            "the quantizer produced an inconsistent QTensor"
        )
    max_code = 2**qt.bits - 1
    if int(qt.q.max()) > max_code or int(qt.zeros.max()) > max_code:
        raise LmcError(
            f"{name} has codes or zero points above {max_code}; the quantizer must clamp them to [0, {max_code}]"
        )


def require_tensors(
    tensors: dict[str, torch.Tensor], keys: tuple[str, ...], name: str, fmt: str
) -> list[torch.Tensor]:
    """tensors[key] for each key, after checking that all are present and qweight is 2-D int32."""
    missing = [key for key in keys if key not in tensors]
    if missing:
        names = ", ".join(f"{name}.{key}" for key in missing)
        raise LmcError(f"{name} lacks {names}; the {fmt} checkpoint is incomplete, re-download or re-export it")
    qweight = tensors["qweight"]
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise LmcError(
            f"{name}.qweight must be a 2-D int32 tensor, got {qweight.dtype} {list(qweight.shape)}; "
            "the checkpoint is corrupt or not in the format its config.json names"
        )
    return [tensors[key] for key in keys]


def group_count(in_features: int, group_size: int, name: str) -> int:
    if group_size <= 0 or in_features % group_size:
        raise LmcError(
            f"group size {group_size} does not divide in_features {in_features} of {name}; "
            "the quantization_config group_size does not match the weights"
        )
    return in_features // group_size


def check_shape(name: str, key: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise LmcError(
            f"{name}.{key} has shape {list(tensor.shape)}, expected {list(expected)} from {name}.qweight and the "
            "group size; the checkpoint is corrupt or its config.json group_size is wrong"
        )
