"""AutoAWQ GEMM (written) and GEMV (read) layouts: round trips and agreement with AutoAWQ 0.2.9's own packing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmcompress.errors import LmcError
from lmcompress.formats import awq_gemm
from lmcompress.formats.packing import identity_groups
from lmcompress.quant.qtensor import QTensor, QuantConfig

GROUP_SIZES = [32, 64, 128]


def exact_linear(qt: QTensor) -> nn.Linear:
    """A float linear whose weight is exactly qt's dequantized weight, so AutoAWQ recovers qt's codes."""
    linear = nn.Linear(qt.shape[1], qt.shape[0], bias=False)
    linear.weight.data = qt.dequantize(torch.float32)
    return linear


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("sym", [False, True])
def test_gemm_round_trip(qtensor, assert_same, group_size, sym):
    qt = qtensor(64, 256, group_size, sym=sym, seed=group_size)
    packed = awq_gemm.pack(qt)
    n_groups = 256 // group_size
    assert packed["qweight"].dtype == torch.int32 and tuple(packed["qweight"].shape) == (256, 8)
    assert packed["qzeros"].dtype == torch.int32 and tuple(packed["qzeros"].shape) == (n_groups, 8)
    assert packed["scales"].dtype == torch.float16 and tuple(packed["scales"].shape) == (n_groups, 64)
    assert_same(awq_gemm.unpack(packed, group_size), qt)


def test_gemm_interleaves_output_columns():
    # Input channel 0 of output columns 0..7 holds codes 1..8; nibble i must hold column
    # (0, 2, 4, 6, 1, 3, 5, 7)[i], i.e. codes 1, 3, 5, 7, 2, 4, 6, 8 from the low nibble up.
    q = torch.zeros(8, 32, dtype=torch.uint8)
    q[:, 0] = torch.arange(1, 9, dtype=torch.uint8)
    qt = QTensor(q=q, scales=torch.ones(8, 1), zeros=torch.zeros(8, 1, dtype=torch.uint8), bits=4, group_size=32)
    expected = 0x86427531 - 2**32  # the same 32 bits as a signed int32
    assert int(awq_gemm.pack(qt)["qweight"][0, 0]) == expected


@pytest.mark.autoawq
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_gemm_packing_is_bit_identical_to_autoawq(qtensor, group_size):
    gemm = pytest.importorskip("awq.modules.linear.gemm")
    qt = qtensor(64, 256, group_size, seed=1)
    # AutoAWQ's quantizer hands from_linear scales and zeros transposed to [in/g, out], zeros as floats.
    reference = gemm.WQLinear_GEMM.from_linear(
        exact_linear(qt), w_bit=4, group_size=group_size, init_only=False,
        scales=qt.scales.T.contiguous(), zeros=qt.zeros.T.float().contiguous(),
    )
    packed = awq_gemm.pack(qt)
    assert torch.equal(packed["qweight"], reference.qweight)
    assert torch.equal(packed["qzeros"], reference.qzeros)
    assert torch.equal(packed["scales"], reference.scales)


@pytest.mark.autoawq
def test_gemm_unpack_dequantizes_like_autoawq(qtensor):
    packing_utils = pytest.importorskip("awq.utils.packing_utils")
    qt = qtensor(64, 256, 64, seed=2)
    packed = awq_gemm.pack(qt)
    # AutoAWQ returns [in, out] in fp16; ours rounds the exact product to fp16 once, as fp16 arithmetic does.
    reference = packing_utils.dequantize_gemm(packed["qweight"], packed["qzeros"], packed["scales"], 4, 64)
    assert torch.equal(awq_gemm.unpack(packed, 64).dequantize(torch.float16), reference.T)


@pytest.mark.autoawq
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_gemv_unpack_reads_autoawq_gemv(qtensor, assert_same, group_size):
    gemv = pytest.importorskip("awq.modules.linear.gemv")
    qt = qtensor(64, 256, group_size, seed=3)
    # GEMV keeps scales and zeros as [out, in/g] and pads them (here to 32 scale columns at g32).
    reference = gemv.WQLinear_GEMV.from_linear(
        exact_linear(qt), w_bit=4, group_size=group_size, init_only=False,
        scales=qt.scales.clone(), zeros=qt.zeros.float(),
    )
    tensors = {"qweight": reference.qweight, "qzeros": reference.qzeros, "scales": reference.scales}
    assert_same(awq_gemm.unpack_gemv(tensors, group_size), qt)


def test_pack_rejects_act_order(qtensor):
    with pytest.raises(LmcError, match="act-order.*--format gptq"):
        awq_gemm.pack(qtensor(64, 256, 64, permuted=True), name="model.layers.0.mlp.down_proj")


def test_pack_accepts_identity_g_idx(qtensor):
    plain = qtensor(64, 256, 64)
    with_g_idx = QTensor(plain.q, plain.scales, plain.zeros, 4, 64, g_idx=identity_groups(256, 64))
    for key, tensor in awq_gemm.pack(plain).items():
        assert torch.equal(awq_gemm.pack(with_g_idx)[key], tensor)


def test_pack_rejects_out_features_not_multiple_of_8(qtensor):
    with pytest.raises(LmcError, match=r"\[60, 256\].*divisible by 8"):
        awq_gemm.pack(qtensor(60, 256, 64), name="lm_head")


def test_unpack_names_inconsistent_tensor(qtensor):
    packed = awq_gemm.pack(qtensor(64, 256, 64))
    packed["scales"] = packed["scales"][:, :32]
    with pytest.raises(LmcError, match=r"q_proj\.scales has shape \[4, 32\], expected \[4, 64\]"):
        awq_gemm.unpack(packed, 64, name="q_proj")
    with pytest.raises(LmcError, match="group size 96 does not divide in_features 256"):
        awq_gemm.unpack(awq_gemm.pack(qtensor(64, 256, 64)), 96)


@pytest.mark.autoawq
def test_quantization_config_matches_autoawq():
    awq_config = pytest.importorskip("awq.models._config")
    reference = awq_config.AwqConfig(zero_point=True, q_group_size=64, w_bit=4, version="gemm")
    assert awq_gemm.quantization_config(QuantConfig(group_size=64)) == reference.to_transformers_dict()
