"""Linear layers: 4-bit weights kept packed compute like their dequantized float weights."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QTensor, QuantConfig
from lmcompress.quant.rtn import quantize_weight
from lmcompress.turbo.models.linear import FloatLinear, QuantLinear, make_linear


def random_qtensor(out_features: int, in_features: int, permuted: bool) -> QTensor:
    gen = torch.Generator().manual_seed(0)
    qt = quantize_weight(torch.randn(out_features, in_features, generator=gen), QuantConfig(group_size=32))
    if permuted:  # act-order: channel i belongs to a scattered group
        qt.g_idx = qt.group_index()[torch.randperm(in_features, generator=gen)].to(torch.int32)
    return qt


@pytest.mark.parametrize("permuted", [False, True])
def test_quant_linear_equals_float_linear_of_dequantized_weight(permuted):
    qt = random_qtensor(48, 96, permuted)
    bias = torch.randn(48)
    x = torch.randn(5, 96)
    linear = make_linear(qt, bias, torch.float32)
    assert isinstance(linear, QuantLinear)
    expected = torch.nn.functional.linear(x, qt.dequantize(), bias)
    torch.testing.assert_close(linear(x), expected)
    assert torch.equal(linear.qtensor().q, qt.q)
    dequantized = make_linear(qt, bias, torch.float32, dequantize=True)
    assert isinstance(dequantized, FloatLinear)
    torch.testing.assert_close(dequantized(x), expected)


def test_quant_linear_holds_half_a_byte_per_weight():
    linear = QuantLinear(random_qtensor(64, 128, permuted=False), None, torch.float32)
    assert linear.qweight.nbytes == 64 * 128 // 2
    assert linear.qweight.dtype == torch.int32


def test_float_linear_casts_to_compute_dtype():
    linear = make_linear(torch.randn(4, 8, dtype=torch.float16), torch.zeros(4), torch.float32)
    assert linear.weight.dtype == linear.bias.dtype == torch.float32


def test_quant_linear_rejects_unpackable_weights():
    qt = random_qtensor(8, 32, permuted=False)
    narrow = QTensor(qt.q[:, :12], qt.scales[:, :1], qt.zeros[:, :1], bits=4, group_size=12)
    with pytest.raises(LmcError, match=r"in_features divisible by 8, got 4 bits and \[8, 12\]"):
        QuantLinear(narrow, None, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QuantLinear's W4A16 kernel path needs a CUDA GPU")
@pytest.mark.parametrize("permuted", [False, True])
def test_quant_linear_on_cuda_runs_the_kernel_and_matches_the_reference(permuted):
    qt = random_qtensor(256, 512, permuted)
    qt = QTensor(qt.q.cuda(), qt.scales.cuda(), qt.zeros.cuda(), 4, 32, None if qt.g_idx is None else qt.g_idx.cuda())
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    linear = make_linear(qt, bias, torch.bfloat16)
    assert linear.qweight.shape == (512 // 8, 256) and linear.qweight.nbytes == 256 * 512 // 2  # kernel layout
    x = torch.randn(7, 512, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x.float(), qt.dequantize(), bias.float())
    assert ((linear(x).float() - expected).abs().max() / expected.abs().max()).item() < 1.6e-2
    assert torch.equal(linear.qtensor().dequantize(), qt.dequantize())
