from functools import partial

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.quant import awq
from lmcompress.quant.awq import (
    ClipSearch,
    apply_scales,
    awq_quantize_layer,
    channel_map,
    fold_scale,
    input_sources,
    search_clip,
    search_scale,
)
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.quant.rtn import ShrinkSearch, fake_quantize, rtn_quantize_layer


def _capture_group_inputs(ctx):
    return ctx.capture_inputs(sorted(set(input_sources(ctx.spec).values())))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_searched_scales_fold_exactly(tiny_case, arch):
    case = tiny_case(arch)
    inputs = _capture_group_inputs(case.ctx)
    applied = apply_scales(case.ctx, inputs, partial(fake_quantize, cfg=case.ctx.cfg))
    assert list(applied) == [group.prev_op for group in case.ctx.spec.scaling_groups]
    # the search restored the float weights and the folding kept the float function ...
    torch.testing.assert_close(case.ctx.batched(case.ctx.call_layer, case.held_out), case.reference, rtol=0, atol=1e-5)
    # ... and the captured inputs, divided by s, are what the scaled layer's linears now read
    for name, recaptured in _capture_group_inputs(case.ctx).items():
        torch.testing.assert_close(inputs[name], recaptured, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_folding_extreme_scales_keeps_the_float_function(tiny_case, arch):
    case = tiny_case(arch)
    generator = torch.Generator().manual_seed(0)
    for group in case.ctx.spec.scaling_groups:
        in_features = case.ctx.linear(group.linears[0]).in_features
        fold_scale(case.ctx, group, torch.exp(torch.empty(in_features).uniform_(-3, 3, generator=generator)))
    torch.testing.assert_close(case.ctx.batched(case.ctx.call_layer, case.held_out), case.reference, rtol=0, atol=1e-5)


def test_gqa_skips_v_to_o_as_autoawq_does(tiny_case):
    case = tiny_case("qwen3", kv_heads=2)
    v_to_o = next(g for g in case.ctx.spec.scaling_groups if g.prev_op == "self_attn.v_proj")
    assert channel_map(case.ctx, v_to_o, gqa_scaling=False) is None
    o_weight = case.ctx.linear("self_attn.o_proj").weight.detach().clone()
    quantizer = partial(fake_quantize, cfg=case.ctx.cfg)
    applied = apply_scales(case.ctx, _capture_group_inputs(case.ctx), quantizer, gqa_scaling=False)
    assert "self_attn.v_proj" not in applied and len(applied) == 3
    assert torch.equal(case.ctx.linear("self_attn.o_proj").weight, o_weight)
    torch.testing.assert_close(case.ctx.batched(case.ctx.call_layer, case.held_out), case.reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gqa_scaling_shares_a_value_channel_scale_across_its_query_heads(tiny_case, arch):
    case = tiny_case(arch, kv_heads=2)  # 4 query heads of 32 channels, 2 KV heads: heads 0, 1 read KV head 0
    o_weight = case.ctx.linear("self_attn.o_proj").weight.detach().clone()
    inputs = _capture_group_inputs(case.ctx)
    applied = apply_scales(case.ctx, inputs, partial(fake_quantize, cfg=case.ctx.cfg), gqa_scaling=True)
    scales = applied["self_attn.v_proj"]
    assert scales.shape == (64,)
    head_scales = torch.cat([scales[:32], scales[:32], scales[32:], scales[32:]])
    torch.testing.assert_close(case.ctx.linear("self_attn.o_proj").weight, o_weight * head_scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(case.ctx.batched(case.ctx.call_layer, case.held_out), case.reference, rtol=0, atol=1e-5)
    for name, recaptured in _capture_group_inputs(case.ctx).items():
        torch.testing.assert_close(inputs[name], recaptured, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "kv_heads", "sym"), [("llama", 4, False), ("llama", 4, True), ("qwen3", 2, False), ("qwen2", 4, False)]
)
def test_awq_beats_rtn_on_held_out_inputs(tiny_case, arch, kv_heads, sym):
    rtn, awq = tiny_case(arch, kv_heads=kv_heads, sym=sym), tiny_case(arch, kv_heads=kv_heads, sym=sym)
    rtn_quantize_layer(rtn.ctx)
    result = awq_quantize_layer(awq.ctx)
    assert set(result) == set(awq.ctx.spec.linears)
    for name, qweight in result.items():
        assert torch.equal(awq.ctx.linear(name).weight, qweight.dequantize())
    assert awq.held_out_mse() < 0.85 * rtn.held_out_mse()


AUTOAWQ_CLIP = ClipSearch(grid=20, max_shrink=0.5, absmax=True)


@pytest.mark.parametrize("search", [ClipSearch(), AUTOAWQ_CLIP], ids=["range", "autoawq"])
def test_clip_shrinks_groups_with_an_outlier_weight(tiny_case, search):
    torch.manual_seed(0)
    cfg = tiny_case().ctx.cfg
    weight = torch.randn(8, 64) * 0.02
    weight[:, 5] = 0.5  # one weight per row 25 sigma out, in group 0 only, on a quiet input channel
    x = torch.randn(4, 32, 64)
    x[..., 5] *= 0.01
    low, high = search_clip(weight, x, cfg, search)
    groups = weight.view(8, 2, 32)
    # the outlier is clipped, within the grid's reach
    assert torch.all(high[:, 0] < 0.5) and torch.all(high[:, 0] >= 0.5 * (1 - search.max_shrink))
    absmax = groups.abs().amax(dim=-1, keepdim=True)
    assert torch.all(high <= absmax) and torch.all(low >= -absmax) and torch.all(low <= 0)


def test_range_clip_narrows_the_short_side_of_a_lopsided_group(tiny_case):
    torch.manual_seed(0)
    cfg = tiny_case().ctx.cfg
    weight = torch.randn(8, 32).abs() * 0.02 - 0.01
    weight[:, 3] = 0.5  # the positive side reaches 0.5 (on a quiet input channel), the negative one about -0.01
    x = torch.randn(4, 32, 32)
    x[..., 3] *= 0.01
    low, high = search_clip(weight, x, cfg, ClipSearch())
    minimum, maximum = weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
    torch.testing.assert_close(low.squeeze(1) / minimum, high.squeeze(1) / maximum)  # one shrink for both ends
    assert torch.all(high.squeeze(1) < maximum)
    absmax_low, _ = search_clip(weight, x, cfg, ClipSearch(absmax=True))
    assert torch.all(absmax_low.squeeze(1) <= minimum)  # +-bound never reaches the short side


def test_default_clip_beats_autoawq_clip_on_unseen_tokens():
    torch.manual_seed(0)
    cfg = QuantConfig(bits=4, group_size=128)
    weight = torch.distributions.Laplace(0.0, 0.02).sample((256, 256))  # heavier tails than a Gaussian, as trained weights
    scale = torch.rand(256) + 0.5
    search_tokens, eval_tokens = torch.randn(1, 512, 256) * scale, torch.randn(4096, 256) * scale

    def unseen_error(search):
        low, high = search_clip(weight, search_tokens, cfg, search)
        clipped = torch.clamp(weight.view(256, 2, 128), low, high).view(256, 256)
        return (eval_tokens @ (fake_quantize(clipped, cfg) - weight).T).pow(2).mean()

    assert unseen_error(ClipSearch()) < 0.99 * unseen_error(AUTOAWQ_CLIP)


@pytest.mark.parametrize(
    "options",
    [{}, {"duo_scaling": False}, {"gqa_scaling": False}, {"range_search": True}, {"clip": False}],
    ids=["defaults", "no-duo-scaling", "no-gqa-scaling", "range-search", "no-clip"],
)
def test_layer_options_reach_the_scale_and_clip_searches(tiny_case, monkeypatch, options):
    case = tiny_case("qwen3", kv_heads=2)
    seen = {"clipped": []}

    def recording_apply_scales(ctx, inputs, quantizer, **kwargs):
        seen.update(kwargs, quantizer=quantizer)
        return {}

    def recording_clip_linear(linear, x, cfg):
        seen["clipped"].append(linear)

    monkeypatch.setattr(awq, "apply_scales", recording_apply_scales)
    monkeypatch.setattr(awq, "clip_linear", recording_clip_linear)
    awq_quantize_layer(case.ctx, **options)
    expected = {"duo_scaling": True, "gqa_scaling": True, "range_search": False, "clip": True} | options
    assert (seen["duo_scaling"], seen["gqa_scaling"]) == (expected["duo_scaling"], expected["gqa_scaling"])
    # the trial quantizer of the scale search: shrink-searched group ranges, or plain min-max ones
    weight = torch.distributions.Laplace(0.0, 0.02).sample((16, 128))
    search = ShrinkSearch() if expected["range_search"] else None
    assert torch.equal(seen["quantizer"](weight), fake_quantize(weight, case.ctx.cfg, search=search))
    # clipping covers every linear, q_proj and k_proj included (AutoAWQ skips those two)
    linears = [case.ctx.linear(name) for name in case.ctx.spec.linears] if expected["clip"] else []
    assert seen["clipped"] == linears


def test_bad_grid_is_rejected(tiny_case):
    with pytest.raises(LmcError, match="n_grid 0"):
        awq_quantize_layer(tiny_case().ctx, n_grid=0)


def _autoawq_quantizer(group_size: int):
    quantizer_module = pytest.importorskip("awq.quantize.quantizer", reason="autoawq is not importable")
    quantizer = quantizer_module.AwqQuantizer.__new__(quantizer_module.AwqQuantizer)
    quantizer.w_bit, quantizer.group_size, quantizer.zero_point, quantizer.duo_scaling = 4, group_size, True, True
    quantizer.n_parallel_calib_samples, quantizer.max_chunk_memory = None, 1024**3
    return quantizer


@pytest.mark.autoawq
def test_scale_search_matches_autoawq(tiny_case):
    ctx = tiny_case().ctx
    reference = _autoawq_quantizer(ctx.cfg.group_size)
    inputs = _capture_group_inputs(ctx)
    for group in ctx.spec.scaling_groups:
        x = inputs[group.linears[0]]
        ours = search_scale(ctx, group, x, partial(fake_quantize, cfg=ctx.cfg))
        inspect = ctx.module(group.inspect)
        # AutoAWQ backs the weights up with {k: v.cpu()}, which copies on a GPU but aliases the live
        # parameters on the CPU, so its in-place W * s of the first ratio corrupts the backup (and the
        # float model).  Give it the copying backup it gets on a GPU.
        inspect.state_dict = lambda m=inspect: {k: v.clone() for k, v in type(m).state_dict(m).items()}
        kwargs = {}
        if group.inspect == "self_attn":
            kwargs = {"position_embeddings": ctx.position_embeddings, "attention_mask": None}
        linears = [ctx.linear(n) for n in group.linears]
        _, _, theirs = reference._search_best_scale(
            ctx.layer, ctx.module(group.prev_op), linears, x, module2inspect=inspect, kwargs=kwargs
        )
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


@pytest.mark.autoawq
def test_clip_search_matches_autoawq(tiny_case):
    ctx = tiny_case().ctx
    reference = _autoawq_quantizer(ctx.cfg.group_size)
    sources = input_sources(ctx.spec)
    inputs = _capture_group_inputs(ctx)
    for name in ("self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        weight, x = ctx.linear(name).weight.detach(), inputs[sources[name]]
        # AutoAWQ's grid stops one step short of its max_shrink; 0.55 makes it end at 0.5, as ours does.
        theirs = reference._compute_best_clip(weight, x, n_grid=20, max_shrink=0.55)
        low, high = search_clip(weight, x, ctx.cfg, AUTOAWQ_CLIP)
        assert torch.equal(high, theirs) and torch.equal(low, -theirs)
