"""The GPTQ v1 layout (AutoGPTQ, and GPTQModel's checkpoint_format "gptq").

Per linear with out x in weight and G groups (G = in/g):
    qweight int32 [in/8, out]   codes packed along in, sequential nibbles
    qzeros  int32 [G, out/8]    zero - 1 packed along out, sequential nibbles
    scales  fp16  [G, out]
    g_idx   int32 [in]          group of each input channel: i // g, or permuted under act-order
Dequantization: w[o, i] = (q[o, i] - (stored_zero + 1)) * s, with group g_idx[i].

The "- 1" is v1's historical off-by-one.  A zero point of 0 has no v1 encoding
that every reader agrees on: AutoGPTQ writes -1 & 0xF = 15, which ExLlama, vLLM's
gptq kernel and AutoGPTQ read back as 16, while GPTQModel loads v1 by adding
0x11111111 to the whole int32, so the 15 carries into the neighbouring zero point.
lmc therefore refuses to write zero 0, and reads a stored 15 as zero 0 (the
writer's intent).
"""

from __future__ import annotations

import torch

from lmcompress.errors import LmcError
from lmcompress.formats.packing import (
    check_packable,
    check_shape,
    is_identity_groups,
    pack_nibbles,
    require_tensors,
    unpack_nibbles,
)
from lmcompress.quant.qtensor import QTensor, QuantConfig

PACKED_NAMES = ("qweight", "qzeros", "scales")
TENSOR_NAMES = PACKED_NAMES + ("g_idx",)


def pack(qt: QTensor, name: str = "linear") -> dict[str, torch.Tensor]:
    """The v1 tensors of one linear, keyed qweight / qzeros / scales / g_idx."""
    check_packable(qt, name, "GPTQ")
    if bool((qt.zeros == 0).any()):
        raise LmcError(
            f"{name} has a group with zero point 0, which GPTQ v1 checkpoints cannot store (they hold zero - 1, "
            "and vLLM/ExLlama read -1 back as 16); quantize with --sym or save with --format awq"
        )
    return {
        "qweight": pack_nibbles(qt.q).T.contiguous(),  # [out, in/8] -> [in/8, out]
        "qzeros": pack_nibbles(qt.zeros.T.to(torch.int64) - 1),  # [G, out/8]
        "scales": qt.scales.T.to(torch.float16).contiguous(),  # [G, out]
        "g_idx": qt.group_index().to(torch.int32),  # [in]
    }


def unpack(tensors: dict[str, torch.Tensor], group_size: int, name: str = "linear") -> QTensor:
    """A QTensor from the v1 tensors of one linear; a missing g_idx means i // group_size."""
    qweight, qzeros, scales = require_tensors(tensors, PACKED_NAMES, name, "GPTQ")
    in_features, out_features = qweight.shape[0] * 8, qweight.shape[1]
    n_groups = scales.shape[0]
    check_shape(name, "scales", scales, (n_groups, out_features))
    check_shape(name, "qzeros", qzeros, (n_groups, out_features // 8))
    g_idx = _read_g_idx(tensors.get("g_idx"), in_features, n_groups, group_size, name)
    stored_zeros = unpack_nibbles(qzeros).T  # [out, G], zero - 1 (mod 16)
    return QTensor(
        q=unpack_nibbles(qweight.T).contiguous(),  # [out, in]
        scales=scales.T.contiguous(),
        zeros=((stored_zeros + 1) & 0xF).contiguous(),
        bits=4,
        group_size=group_size,
        g_idx=g_idx,
    )


def quantize_config(
    cfg: QuantConfig,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    static_groups: bool = False,
    true_sequential: bool = True,
) -> dict:
    """quantize_config.json, which is also config.json's "quantization_config" (as GPTQModel writes both)."""
    return {
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": static_groups,
        "sym": cfg.sym,
        "true_sequential": true_sequential,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def _read_g_idx(
    g_idx: torch.Tensor | None, in_features: int, n_groups: int, group_size: int, name: str
) -> torch.Tensor | None:
    """None for the identity grouping (what QTensor means by None), else the int32 g_idx."""
    if g_idx is None:
        if in_features != n_groups * group_size:
            raise LmcError(
                f"{name} has {n_groups} groups but in_features {in_features} and group size {group_size}; "
                "the checkpoint is corrupt or its config.json group_size is wrong"
            )
        return None
    check_shape(name, "g_idx", g_idx, (in_features,))
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise LmcError(f"{name}.g_idx names groups outside [0, {n_groups}); the checkpoint is corrupt")
    if in_features == n_groups * group_size and is_identity_groups(g_idx, group_size):
        return None
    return g_idx.to(torch.int32)
