import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.quant.rtn import (
    ShrinkSearch,
    fake_quantize,
    group_params,
    quantize_codes,
    quantize_weight,
    rtn_quantize_layer,
    searched_group_params,
)


def _autoawq_quantizer(group_size: int):
    """AutoAWQ 0.2.9's own pseudo_quantize_tensor, on an instance built without loading a model."""
    quantizer_module = pytest.importorskip("awq.quantize.quantizer", reason="autoawq is not importable")
    quantizer = quantizer_module.AwqQuantizer.__new__(quantizer_module.AwqQuantizer)
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point = 4, group_size, True
    return quantizer


@pytest.mark.autoawq
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_asymmetric_matches_autoawq(group_size):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(1, 256) * 0.1
    reference, ref_scales, ref_zeros = _autoawq_quantizer(group_size).pseudo_quantize_tensor(w.clone())
    qweight = quantize_weight(w, QuantConfig(group_size=group_size))
    torch.testing.assert_close(qweight.scales, ref_scales, rtol=0, atol=0)
    torch.testing.assert_close(qweight.zeros.float(), ref_zeros, rtol=0, atol=0)
    torch.testing.assert_close(fake_quantize(w, QuantConfig(group_size=group_size)), reference, rtol=0, atol=0)


def test_symmetric_follows_gptq_convention():
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    groups = w.view(16, 4, 32)
    scale = 2 * groups.abs().amax(dim=-1, keepdim=True) / 15
    codes = (torch.round(groups / scale) + 8).clamp(0, 15)
    qweight = quantize_weight(w, QuantConfig(group_size=32, sym=True))
    assert torch.equal(qweight.zeros, torch.full((16, 4), 8, dtype=torch.uint8))
    torch.testing.assert_close(qweight.scales, scale.squeeze(-1))
    assert torch.equal(qweight.q, codes.view(16, 128).to(torch.uint8))


@pytest.mark.parametrize("sym", [False, True])
def test_error_is_at_most_half_a_step(sym):
    torch.manual_seed(2)
    w = torch.randn(32, 256)
    w[0, :32] = torch.rand(32) + 1.0  # a single-signed group: AutoAWQ's clamped zero would clip it to one value
    w[1, 32:64] = -torch.rand(32) - 1.0
    w[2, 64:96] = 0.0
    qweight = quantize_weight(w, QuantConfig(group_size=32, sym=sym))
    assert qweight.q.dtype == torch.uint8 and int(qweight.q.max()) <= 15
    half_step = qweight.scales.repeat_interleave(32, dim=1) / 2
    assert torch.all((w - qweight.dequantize()).abs() <= half_step * (1 + 1e-5))
    assert torch.all(qweight.dequantize()[2, 64:96] == 0)


def test_group_size_must_divide_in_features():
    message = r"group size 64 does not divide in_features 96 of model\.layers\.0\.mlp\.down_proj; use a --group-size"
    with pytest.raises(LmcError, match=message):
        quantize_weight(torch.randn(8, 96), QuantConfig(group_size=64), "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weight_names_the_tensor(bad):
    w = torch.randn(8, 64)
    w[3, 7] = bad
    with pytest.raises(LmcError, match=r"model\.layers\.2\.self_attn\.q_proj contains NaN or inf.*checkpoint"):
        quantize_weight(w, QuantConfig(group_size=32), "model.layers.2.self_attn.q_proj")


def test_rtn_layer_quantizes_every_linear_and_writes_back(tiny_case):
    case = tiny_case()
    result = rtn_quantize_layer(case.ctx)
    assert set(result) == set(case.ctx.spec.linears)
    for name, qweight in result.items():
        assert torch.equal(case.ctx.linear(name).weight, qweight.dequantize())
    assert 0 < case.held_out_mse()


def test_min_zero_keeps_gptq_storable_zero_codes():
    """A nonnegative group would get zero code 0, which GPTQ v1 cannot store; min_zero=1 lifts it."""
    w = torch.rand(4, 128) + 0.1
    assert int(quantize_weight(w, QuantConfig()).zeros.min()) == 0
    qt = quantize_weight(w, QuantConfig(min_zero=1))
    assert int(qt.zeros.min()) == 1
    assert (qt.dequantize() - w).abs().max() <= qt.scales.max() * 1.01


def _norm_error(w, scale, zero, cfg, norm=2.4):
    """sum |Q(w) - w|^norm of each group of w [..., group] -> [..., 1]."""
    return ((quantize_codes(w, scale, zero, cfg) - zero) * scale - w).abs().pow(norm).sum(-1, keepdim=True)


@pytest.mark.parametrize("sym", [False, True])
def test_shrink_search_never_loses_to_the_full_range(sym):
    torch.manual_seed(3)
    cfg = QuantConfig(group_size=128, sym=sym)
    w = torch.distributions.Laplace(0.0, 0.02).sample((64, 2, 128))
    full = _norm_error(w, *group_params(w, cfg), cfg)
    searched_scale, searched_zero = searched_group_params(w, cfg, ShrinkSearch())
    searched = _norm_error(w, searched_scale, searched_zero, cfg)
    assert torch.all(searched <= full) and searched.sum() < 0.95 * full.sum()
    assert torch.all(searched_scale <= group_params(w, cfg)[0] * (1 + 1e-6))  # shrinking only
    assert searched_zero.min() >= 0 and searched_zero.max() <= 15


def test_shrink_search_without_steps_is_min_max():
    w = torch.randn(8, 2, 32)
    cfg = QuantConfig(group_size=32)
    for expected, found in zip(group_params(w, cfg), searched_group_params(w, cfg, ShrinkSearch(max_shrink=0.0))):
        assert torch.equal(expected, found)
