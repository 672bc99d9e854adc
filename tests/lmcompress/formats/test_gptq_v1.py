"""GPTQ v1 layout: round trips, an independent loop reference, and AutoAWQ's own AWQ -> GPTQ (ExLlama) repacker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GPTQConfig

from lmcompress.errors import LmcError
from lmcompress.formats import awq_gemm, gptq_v1
from lmcompress.formats.packing import identity_groups
from lmcompress.quant.qtensor import QTensor, QuantConfig

GROUP_SIZES = [32, 64, 128]


def reference_v1(qt: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qweight and qzeros built code by code from the documented layout, with Python ints."""
    out_features, in_features = qt.shape
    n_groups = qt.scales.shape[1]
    q, zeros = qt.q.tolist(), qt.zeros.tolist()
    qweight = np.zeros((in_features // 8, out_features), dtype=np.uint32)
    for o in range(out_features):
        for i in range(in_features):  # packed along in: row i // 8, nibble i % 8
            qweight[i // 8, o] |= q[o][i] << (4 * (i % 8))
    qzeros = np.zeros((n_groups, out_features // 8), dtype=np.uint32)
    for g in range(n_groups):
        for o in range(out_features):  # packed along out, storing zero - 1
            qzeros[g, o // 8] |= (zeros[o][g] - 1) << (4 * (o % 8))
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("permuted", [False, True])
def test_round_trip(qtensor, assert_same, group_size, sym, permuted):
    qt = qtensor(64, 256, group_size, sym=sym, permuted=permuted, min_zero=1, seed=group_size)
    packed = gptq_v1.pack(qt)
    n_groups = 256 // group_size
    assert packed["qweight"].dtype == torch.int32 and tuple(packed["qweight"].shape) == (32, 64)
    assert packed["qzeros"].dtype == torch.int32 and tuple(packed["qzeros"].shape) == (n_groups, 8)
    assert packed["scales"].dtype == torch.float16 and tuple(packed["scales"].shape) == (n_groups, 64)
    assert packed["g_idx"].dtype == torch.int32 and tuple(packed["g_idx"].shape) == (256,)
    unpacked = gptq_v1.unpack(packed, group_size)
    assert_same(unpacked, qt)
    assert (unpacked.g_idx is None) == (not permuted)  # identity groups come back as QTensor's None


@pytest.mark.parametrize("permuted", [False, True])
def test_matches_loop_reference(qtensor, permuted):
    qt = qtensor(64, 256, 32, permuted=permuted, min_zero=1, seed=5)
    qweight, qzeros = reference_v1(qt)
    packed = gptq_v1.pack(qt)
    assert torch.equal(packed["qweight"], qweight)
    assert torch.equal(packed["qzeros"], qzeros)
    assert torch.equal(packed["g_idx"], qt.group_index().to(torch.int32))


def test_symmetric_zero_is_stored_as_7(qtensor):
    packed = gptq_v1.pack(qtensor(64, 256, 128, sym=True))
    assert (packed["qzeros"] == 0x77777777).all()


@pytest.mark.autoawq
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_matches_autoawq_exllama_repacking(qtensor, group_size):
    # AutoAWQ converts its GEMM tensors to the GPTQ v1 (ExLlama) layout, zero - 1 included;
    # lmc's GPTQ packing of the same QTensor must produce the same bits.
    packing_utils = pytest.importorskip("awq.utils.packing_utils")
    qt = qtensor(64, 256, group_size, min_zero=1, seed=7)
    awq = awq_gemm.pack(qt)
    qweight, qzeros = packing_utils.unpack_reorder_pack(awq["qweight"], awq["qzeros"], 4)
    packed = gptq_v1.pack(qt)
    assert torch.equal(packed["qweight"], qweight)
    assert torch.equal(packed["qzeros"], qzeros)


def test_pack_refuses_zero_point_0(qtensor):
    qt = qtensor(64, 256, 64, min_zero=1)
    qt.zeros[3, 1] = 0
    with pytest.raises(LmcError, match="zero point 0.*--sym or save with --format awq"):
        gptq_v1.pack(qt, name="model.layers.0.self_attn.q_proj")


def test_unpack_reads_wrapped_zero_as_0(qtensor):
    # AutoGPTQ stores a zero point of 0 as (0 - 1) & 0xF = 15; lmc reads back the writer's 0.
    qt = qtensor(64, 256, 64, min_zero=1)
    packed = gptq_v1.pack(qt)
    packed["qzeros"][0, 0] |= 0xF  # output column 0 of group 0
    assert int(gptq_v1.unpack(packed, 64).zeros[0, 0]) == 0


def test_unpack_without_g_idx_uses_contiguous_groups(qtensor, assert_same):
    qt = qtensor(64, 256, 64, min_zero=1)
    packed = gptq_v1.pack(qt)
    del packed["g_idx"]
    assert_same(gptq_v1.unpack(packed, 64), qt)


def test_unpack_names_bad_tensors(qtensor):
    packed = gptq_v1.pack(qtensor(64, 256, 64, min_zero=1))
    bad_g_idx = dict(packed, g_idx=identity_groups(256, 32))  # groups 0..7 but only 4 exist
    with pytest.raises(LmcError, match=r"o_proj\.g_idx names groups outside \[0, 4\)"):
        gptq_v1.unpack(bad_g_idx, 64, name="o_proj")
    bad_zeros = dict(packed, qzeros=packed["qzeros"][:, :4])
    with pytest.raises(LmcError, match=r"o_proj\.qzeros has shape \[4, 4\], expected \[4, 8\]"):
        gptq_v1.unpack(bad_zeros, 64, name="o_proj")


def test_quantize_config_parses_as_transformers_gptq_config():
    config = gptq_v1.quantize_config(
        QuantConfig(group_size=64, sym=False), desc_act=True, damp_percent=0.05, static_groups=True,
        true_sequential=False,
    )
    assert config["static_groups"] is True and config["quant_method"] == "gptq"
    parsed = GPTQConfig.from_dict(config)
    assert (parsed.bits, parsed.group_size, parsed.desc_act, parsed.sym) == (4, 64, True, False)
    assert (parsed.damp_percent, parsed.true_sequential, parsed.format) == (0.05, False, "gptq")
