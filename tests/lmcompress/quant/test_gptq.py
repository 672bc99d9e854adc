import logging

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.quant import gptq
from lmcompress.quant.gptq import (
    RunningHessian,
    gptq_quantize_layer,
    gptq_quantize_weight,
    hessian_inverse_upper,
)
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.quant.rtn import (
    ShrinkSearch,
    group_params,
    quantize_codes,
    quantize_weight,
    rtn_quantize_layer,
    searched_group_params,
)


@pytest.mark.parametrize(
    ("options", "sym", "arch", "kv_heads"),
    [
        ({}, False, "llama", 4),
        ({}, True, "qwen2", 4),
        ({"act_order": True}, False, "qwen3", 2),
        ({"act_order": True, "static_groups": True}, False, "llama", 4),
    ],
)
def test_gptq_beats_rtn_on_held_out_inputs(tiny_case, options, sym, arch, kv_heads):
    rtn, quantized = tiny_case(arch, kv_heads=kv_heads, sym=sym), tiny_case(arch, kv_heads=kv_heads, sym=sym)
    rtn_quantize_layer(rtn.ctx)
    result = gptq_quantize_layer(quantized.ctx, **options)
    assert set(result) == set(quantized.ctx.spec.linears)
    for name, qweight in result.items():
        assert torch.equal(quantized.ctx.linear(name).weight, qweight.dequantize())
    assert quantized.held_out_mse() < 0.6 * rtn.held_out_mse()


def test_later_sets_calibrate_on_the_partially_quantized_layer(tiny_case, monkeypatch):
    case = tiny_case()
    original = {name: case.ctx.linear(name).weight.detach().clone() for name in case.ctx.spec.linears}
    seen = {}

    def recording_accumulate(ctx, names, accumulate=gptq.accumulate_hessians):
        hessians = accumulate(ctx, names)
        seen.update(hessians)
        return dict(hessians)

    monkeypatch.setattr(gptq, "accumulate_hessians", recording_accumulate)
    result = gptq_quantize_layer(case.ctx)
    # Rebuild o_proj's Hessian by hand: float layer, then q/k/v replaced by their quantized weights.
    with torch.no_grad():
        for name, weight in original.items():
            case.ctx.linear(name).weight.copy_(weight)
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            case.ctx.linear(name).weight.copy_(result[name].dequantize())
    expected = RunningHessian(torch.zeros(128, 128))
    expected.add(case.ctx.capture_inputs(["self_attn.o_proj"])["self_attn.o_proj"])
    torch.testing.assert_close(seen["self_attn.o_proj"], expected.h, rtol=1e-5, atol=1e-6)


def test_running_hessian_is_2_xxt_over_n():
    x = torch.randn(7, 5, 16)
    running = RunningHessian(torch.zeros(16, 16))
    for chunk in x.split(3):
        running.add(chunk)
    rows = x.reshape(-1, 16)
    torch.testing.assert_close(running.h, 2 * rows.T @ rows / rows.shape[0])


def _correlated_hessian(in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, in_features, generator=generator) @ torch.randn(in_features, in_features, generator=generator)
    x *= torch.rand(in_features, generator=generator) * 3  # unequal channel energies: a non-trivial act-order
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("act_order", [False, True])
def test_lazy_block_updates_equal_one_block(monkeypatch, act_order):
    """Blocking is only a reordering of the same updates: 4 blocks of 128 give the codes of one 512 block."""
    torch.manual_seed(3)
    cfg = QuantConfig(group_size=64)
    weight, hessian = torch.randn(32, 512), _correlated_hessian(512, seed=3)
    blocked = gptq_quantize_weight(weight, hessian, cfg, "x", act_order=act_order)
    monkeypatch.setattr(gptq, "BLOCK_SIZE", 512)
    single = gptq_quantize_weight(weight, hessian, cfg, "x", act_order=act_order)
    assert (blocked.q == single.q).float().mean() > 0.999


def test_act_order_g_idx_groups_channels_by_descending_activity():
    torch.manual_seed(0)
    cfg = QuantConfig(group_size=32)
    weight, hessian = torch.randn(16, 128), _correlated_hessian(128)
    qweight = gptq_quantize_weight(weight, hessian, cfg, "test.linear", act_order=True)
    g_idx = qweight.g_idx
    assert g_idx.dtype == torch.int32 and g_idx.shape == (128,)
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 32))
    assert not torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 32)
    processing_order = torch.argsort(hessian.diagonal(), descending=True)
    assert torch.equal(g_idx[processing_order].long(), torch.arange(128) // 32)
    # codes sit in the original channel order: the output error beats RTN's
    error = lambda w: ((w - weight) @ hessian @ (w - weight).T).trace()  # noqa: E731
    assert error(qweight.dequantize()) < 0.8 * error(quantize_weight(weight, cfg).dequantize())


def _group_params(groups, cfg, range_search):
    return searched_group_params(groups, cfg, ShrinkSearch()) if range_search else group_params(groups, cfg)


@pytest.mark.parametrize("range_search", [False, True])
def test_static_groups_keep_the_identity_grouping(range_search):
    torch.manual_seed(1)
    cfg = QuantConfig(group_size=32)
    weight, hessian = torch.randn(16, 128), _correlated_hessian(128, seed=1)
    qweight = gptq_quantize_weight(
        weight, hessian, cfg, "test.linear", act_order=True, static_groups=True, range_search=range_search
    )
    assert qweight.g_idx is None
    scale, zero = _group_params(weight.view(16, 4, 32), cfg, range_search)
    torch.testing.assert_close(qweight.scales, scale.squeeze(-1), rtol=0, atol=0)
    assert torch.equal(qweight.zeros, zero.squeeze(-1).to(torch.uint8))


@pytest.mark.parametrize("range_search", [False, True])
def test_uncorrelated_inputs_make_gptq_round_to_nearest(range_search):
    """With H = I no error is propagated: GPTQ is RTN with its group ranges (min-max or the shrink search)."""
    torch.manual_seed(4)
    cfg = QuantConfig(group_size=32)
    weight = torch.randn(16, 128)
    qweight = gptq_quantize_weight(weight, torch.eye(128), cfg, "test.linear", range_search=range_search)
    groups = weight.view(16, 4, 32)
    scale, zero = _group_params(groups, cfg, range_search)
    torch.testing.assert_close(qweight.scales, scale.squeeze(-1), rtol=0, atol=0)
    assert torch.equal(qweight.q, quantize_codes(groups, scale, zero, cfg).view(16, 128).to(torch.uint8))
    if range_search:
        assert torch.any(scale < group_params(groups, cfg)[0])


@pytest.mark.parametrize("options", [{}, {"range_search": False}], ids=["default", "no-range-search"])
def test_layer_passes_range_search_to_every_linear(tiny_case, monkeypatch, options):
    seen = []

    def recording_quantize_weight(*args, quantize=gptq.gptq_quantize_weight, **kwargs):
        seen.append(kwargs["range_search"])
        return quantize(*args, **kwargs)

    monkeypatch.setattr(gptq, "gptq_quantize_weight", recording_quantize_weight)
    case = tiny_case()
    gptq_quantize_layer(case.ctx, **options)
    assert seen == [options.get("range_search", True)] * len(case.ctx.spec.linears)


def test_dead_input_channels_get_zero_weights():
    torch.manual_seed(2)
    hessian = _correlated_hessian(64)
    hessian[:, 9] = 0
    hessian[9, :] = 0
    qweight = gptq_quantize_weight(torch.randn(8, 64), hessian, QuantConfig(group_size=32), "test.linear")
    dequantized = qweight.dequantize()
    assert torch.isfinite(dequantized).all() and torch.all(dequantized[:, 9] == 0)


def test_failed_cholesky_raises_damping_with_a_warning(caplog):
    singular = torch.ones(64, 64)  # rank 1: the second pivot is exactly 0
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(singular)
    with caplog.at_level(logging.WARNING, logger="lmcompress.quant.gptq"):
        upper = hessian_inverse_upper(singular, 0.0, "model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj" in caplog.text and "raised it to 0.01" in caplog.text
    damped = singular + 0.01 * torch.eye(64)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(damped), rtol=1e-3, atol=1e-3)

    with caplog.at_level(logging.WARNING, logger="lmcompress.quant.gptq"):
        qweight = gptq_quantize_weight(torch.randn(8, 64), singular, QuantConfig(group_size=32), "x", damp_percent=0.0)
    assert torch.isfinite(qweight.dequantize()).all()


def test_positive_definite_hessian_keeps_its_damping(caplog):
    hessian = _correlated_hessian(64)
    with caplog.at_level(logging.WARNING, logger="lmcompress.quant.gptq"):
        upper = hessian_inverse_upper(hessian, 0.01, "x")
    assert caplog.text == ""
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(64)
    torch.testing.assert_close(upper.T @ upper @ damped, torch.eye(64), rtol=1e-3, atol=1e-3)


def test_unfactorable_hessian_is_an_lmc_error():
    with pytest.raises(LmcError, match="cannot invert the Hessian of model.layers.1.mlp.down_proj"):
        hessian_inverse_upper(-torch.eye(32), 0.01, "model.layers.1.mlp.down_proj")


def test_damp_percent_out_of_range(tiny_case):
    with pytest.raises(LmcError, match=r"damp_percent 2 is out of range; use a value in \[0, 1\]"):
        gptq_quantize_layer(tiny_case().ctx, damp_percent=2)
