"""KV pools: float round trips, int8/int4 error bounds per token and head, static tables, bytes and sizing.

The reference writes here are what the Triton write_kv must reproduce on CUDA
(tests/turbo/kernels/test_kv_write_kernel.py).
"""

from __future__ import annotations

import pytest
import torch

from lmcompress.calib.kv_stats import KVScales
from lmcompress.errors import LmcError
from lmcompress.turbo.kv_cache import MIN_SCALE, KVCache, KVCacheSpec, free_memory_budget, quant_params

LAYERS, HEADS, DIM, BLOCK = 2, 3, 16, 4


def spec(dtype: str, static: KVScales | None = None, head_dim: int = DIM) -> KVCacheSpec:
    return KVCacheSpec(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=head_dim, block_size=BLOCK,
                       dtype=dtype, static_scales=static)


def kv_tokens(n: int, seed: int = 0) -> torch.Tensor:
    """[n, HEADS, DIM] with per-head offsets and spreads, an outlier channel, and one constant row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, HEADS, DIM, generator=gen) * torch.tensor([0.5, 2.0, 8.0])[:, None] + torch.tensor([0.0, 3.0, -1.0])[:, None]
    x[:, 1, 5] *= 20
    x[0, 0] = 0.75  # max == min: must come back exactly
    return x


def shuffled_slots(n: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    return torch.randperm(num_blocks * BLOCK, generator=torch.Generator().manual_seed(seed))[:n]


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_dynamic_quantization_error_is_at_most_half_a_step_per_token_and_head(dtype):
    cache = KVCache(spec(dtype), num_blocks=8)
    layer = cache.layers[1]
    keys, values = kv_tokens(20, seed=1), kv_tokens(20, seed=2)
    slots = shuffled_slots(20, 8)
    layer.write(slots, keys, values)
    bits = 8 if dtype == "int8" else 4
    for pool, x in ((layer.keys, keys), (layer.values, values)):
        low = x.amin(-1, keepdim=True)
        scale, zero = quant_params(x, bits)  # [20, HEADS, 1], float16 values
        torch.testing.assert_close(zero, low.half().float(), rtol=0, atol=0)
        span = ((x.amax(-1, keepdim=True) - zero) * (1.0 / (2**bits - 1))).clamp(min=MIN_SCALE)
        torch.testing.assert_close(scale, span.half().float(), rtol=0, atol=0)
        # Stored as float16 pairs, exactly the values quantization used.
        assert pool.meta.dtype == torch.float16
        assert torch.equal(pool.meta[slots].float(), torch.cat([scale, zero], dim=-1))
        error = (pool.read(slots, torch.float32) - x).abs()
        # Half a step, or float16's rounding of the zero when the range is tiny next to |min|.
        bound = torch.maximum(scale / 2, zero - low)
        assert (error <= bound * (1 + 1e-5) + 1e-7).all()
        assert error.amax() > scale.amin() / 8  # it really is quantized
        assert torch.equal(pool.read(slots[:1], torch.float32)[0, 0], x[0, 0])


def test_float16_scales_lose_at_most_float16_rounding_on_narrow_rows():
    """A row whose range is tiny next to its offset: the float16 zero can sit above the minimum."""
    x = (1000.3 + torch.linspace(0, 0.3, DIM)).expand(1, HEADS, DIM).clone()  # float16 rounds 1000.3 to 1000.5
    cache = KVCache(spec("int8"), num_blocks=1)
    cache.layers[0].write(torch.tensor([2]), x, x)
    error = (cache.layers[0].keys.read(torch.tensor([2]), torch.float32) - x).abs()
    assert error.amax() <= 0.25  # float16's half-ulp between 512 and 1024
    assert error.amax() > 0.1  # far above an int8 step of this row: the zero's rounding shows
    assert error[..., -1].amax() < 0.3 / 255  # above the zero, codes still resolve the range


def test_negative_slots_are_skipped():
    """Padding rows of a CUDA-graph batch carry slot -1 and must leave the pool untouched."""
    for dtype in ("float16", "int8", "int4"):
        padded, kept = KVCache(spec(dtype), num_blocks=2), KVCache(spec(dtype), num_blocks=2)
        x = kv_tokens(4, seed=9)
        padded.layers[0].write(torch.tensor([3, -1, 6, -1]), x, x * 2)
        kept.layers[0].write(torch.tensor([3, 6]), x[[0, 2]], x[[0, 2]] * 2)
        for got, expected in zip(vars_of(padded.layers[0]), vars_of(kept.layers[0])):
            assert torch.equal(got, expected)
        assert padded.layers[0].keys.data[7].abs().sum() == 0  # the last slot: -1 did not wrap around


def vars_of(layer) -> list[torch.Tensor]:
    return [t for pool in (layer.keys, layer.values) for t in (pool.data, getattr(pool, "meta", None)) if t is not None]


@pytest.mark.parametrize("dtype, torch_dtype", [("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_float_pool_round_trip(dtype, torch_dtype):
    cache = KVCache(spec(dtype), num_blocks=8)
    keys, values = kv_tokens(10), kv_tokens(10, seed=3)
    slots = shuffled_slots(10, 8, seed=4)
    cache.layers[0].write(slots, keys, values)
    got_keys, got_values = cache.layers[0].read(slots.flip(0), torch.float32)
    assert torch.equal(got_keys, keys.flip(0).to(torch_dtype).float())
    assert torch.equal(got_values, values.flip(0).to(torch_dtype).float())
    assert not cache.layers[1].keys.data.any()  # layers have their own pools


def test_overwriting_a_slot_replaces_codes_and_scales():
    cache = KVCache(spec("int8"), num_blocks=2)
    slot = torch.tensor([5])
    cache.layers[0].write(slot, kv_tokens(1, seed=5) * 100, kv_tokens(1, seed=6))
    new = kv_tokens(1, seed=7)
    cache.layers[0].write(slot, new, new)
    scale, _ = quant_params(new, 8)  # the old tokens' scales were 100x coarser
    assert ((cache.layers[0].read(slot, torch.float32)[0] - new).abs() <= scale / 2 + 1e-6).all()


def static_tables(bits: int, low: float = -4.0, high: float = 4.0) -> KVScales:
    """Per-head tables [layers, heads] (version 1 files): one range for every channel."""
    scale = torch.full((LAYERS, HEADS), (high - low) / (2**bits - 1))
    zero = torch.full((LAYERS, HEADS), low)
    return KVScales(bits=bits, k_scale=scale, k_zero=zero, v_scale=scale * 2, v_zero=zero * 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_static_scales_quantize_with_the_calibrated_table(bits):
    tables = static_tables(bits)
    cache = KVCache(spec(f"int{bits}", tables), num_blocks=4)
    layer = cache.layers[1]
    assert layer.keys.meta is None and layer.values.meta is None
    assert layer.keys.static_scale.shape == (HEADS, DIM)  # per head, broadcast over channels
    x = torch.rand(6, HEADS, DIM, generator=torch.Generator().manual_seed(8)) * 8 - 4  # inside [-4, 4]
    x[0, 0, 0] = 100.0  # outside the calibrated range: clamped to the top code
    slots = shuffled_slots(6, 4)
    layer.write(slots, x, x)
    keys, values = layer.read(slots, torch.float32)
    step = (8.0 / (2**bits - 1))
    inside = torch.ones_like(x, dtype=torch.bool)
    inside[0, 0, 0] = False
    assert ((keys - x).abs()[inside] <= step / 2 + 1e-5).all()
    assert keys[0, 0, 0] == pytest.approx(4.0)
    assert ((values - x).abs()[inside] <= step + 1e-5).all()  # V's table is twice as coarse
    assert ((values - x).abs()[inside] > step / 2 + 1e-5).any()


@pytest.mark.parametrize("bits", [8, 4])
def test_per_channel_static_tables_quantize_each_channel_in_its_own_range(bits):
    """[layers, heads, head_dim] tables (calib/kv_stats.py version 2): an outlier channel keeps its own range."""
    gen = torch.Generator().manual_seed(10)
    low = -torch.rand(LAYERS, HEADS, DIM, generator=gen) - 0.5
    high = torch.rand(LAYERS, HEADS, DIM, generator=gen) + 0.5
    high[:, :, 3] = 50.0  # an outlier channel, as keys after RoPE have
    scale = (high - low) / (2**bits - 1)
    tables = KVScales(bits=bits, k_scale=scale, k_zero=low, v_scale=scale, v_zero=low)
    layer = KVCache(spec(f"int{bits}", tables), num_blocks=4).layers[0]
    x = low[0] + torch.rand(5, HEADS, DIM, generator=gen) * (high[0] - low[0])  # every channel inside its range
    slots = shuffled_slots(5, 4, seed=3)
    layer.write(slots, x, x)
    error = (layer.keys.read(slots, torch.float32) - x).abs()
    assert (error <= scale[0] / 2 * (1 + 1e-5) + 1e-6).all()
    ordinary = torch.ones(DIM, dtype=torch.bool)
    ordinary[3] = False
    # One range per head would spend the levels on the outlier: steps of 50 / levels everywhere.
    assert error[..., ordinary].amax() < 2.0 / (2**bits - 1)


def test_per_head_tables_act_as_constant_per_channel_tables():
    per_head = static_tables(4)
    per_channel = KVScales(4, *(t[..., None].expand(-1, -1, DIM).clone()
                                for t in (per_head.k_scale, per_head.k_zero, per_head.v_scale, per_head.v_zero)))
    x = kv_tokens(6, seed=11)
    slots = shuffled_slots(6, 4, seed=5)
    caches = [KVCache(spec("int4", tables), num_blocks=4) for tables in (per_head, per_channel)]
    for cache in caches:
        cache.layers[1].write(slots, x, x)
    assert torch.equal(caches[0].layers[1].keys.data, caches[1].layers[1].keys.data)
    assert torch.equal(caches[0].layers[1].values.static_zero, caches[1].layers[1].values.static_zero)


def test_spec_rejects_bad_settings():
    with pytest.raises(LmcError, match="KV cache dtype 'fp8' is not supported"):
        spec("fp8")
    with pytest.raises(LmcError, match="int4 KV cache needs head_dim divisible by 8"):
        spec("int4", head_dim=12)
    with pytest.raises(LmcError, match="static KV scales apply to int8/int4 caches"):
        spec("float16", static_tables(8))
    with pytest.raises(LmcError, match="static KV scales are for int4 but the cache is int8"):
        spec("int8", static_tables(4))
    wrong = KVScales(bits=8, k_scale=torch.ones(LAYERS, 1), k_zero=torch.ones(LAYERS, 1),
                     v_scale=torch.ones(LAYERS, 1), v_zero=torch.ones(LAYERS, 1))
    with pytest.raises(LmcError, match=r"k_scale has shape \[2, 1\] but the model needs \[layers, kv_heads\] = "
                                       r"\[2, 3\] or \[layers, kv_heads, head_dim\] = \[2, 3, 16\]"):
        spec("int8", wrong)
    channels = torch.ones(LAYERS, HEADS, DIM)
    mixed = KVScales(bits=8, k_scale=channels, k_zero=channels, v_scale=channels, v_zero=channels[..., :8])
    with pytest.raises(LmcError, match=r"v_zero has shape \[2, 3, 8\]"):
        spec("int8", mixed)


def test_pool_sizing_from_a_byte_budget():
    int8 = spec("int8")
    per_block = int8.bytes_per_block()
    assert int8.num_blocks_for(10 * per_block + per_block - 1) == 10
    assert spec("int4").num_blocks_for(10 * per_block) > 10
    with pytest.raises(LmcError, match="holds no block"):
        int8.num_blocks_for(per_block - 1)
    assert free_memory_budget(torch.device("cpu"), 0.5) > 0
    with pytest.raises(LmcError, match="fraction 1.5 is out of range"):
        free_memory_budget(torch.device("cpu"), 1.5)
