"""KV pools: float round trips, int8/int4 error bounds per token and head, static tables, bytes and sizing."""

from __future__ import annotations

import pytest
import torch

from lmcompress.calib.kv_stats import KVScales
from lmcompress.errors import LmcError
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec, free_memory_budget, quant_params

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
        scale, zero = quant_params(x, bits)  # [20, HEADS, 1]
        torch.testing.assert_close(scale, (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)).clamp(min=1e-8) / (2**bits - 1))
        torch.testing.assert_close(zero, x.amin(-1, keepdim=True))
        error = (pool.read(slots, torch.float32) - x).abs()
        assert (error <= scale / 2 * (1 + 1e-5) + 1e-6).all()
        assert error.amax() > scale.amin() / 8  # it really is quantized
        assert torch.equal(pool.read(slots[:1], torch.float32)[0, 0], x[0, 0])


def test_int4_pool_holds_half_the_code_bytes_of_int8_and_the_same_metadata():
    int8, int4 = KVCache(spec("int8"), num_blocks=5), KVCache(spec("int4"), num_blocks=5)
    pool8, pool4 = int8.layers[0].keys, int4.layers[0].keys
    assert pool4.data.nbytes * 2 == pool8.data.nbytes == 5 * BLOCK * HEADS * DIM
    assert pool4.meta.nbytes == pool8.meta.nbytes == 5 * BLOCK * HEADS * 2 * 4
    for cache in (int8, int4):
        assert cache.nbytes == 5 * cache.spec.bytes_per_block()


def test_bytes_per_token_per_dtype():
    # 2 (K and V) x 2 layers x 3 heads x per-head bytes
    assert spec("float32").bytes_per_token() == 12 * DIM * 4
    assert spec("float16").bytes_per_token() == spec("bfloat16").bytes_per_token() == 12 * DIM * 2
    assert spec("int8").bytes_per_token() == 12 * (DIM + 8)
    assert spec("int4").bytes_per_token() == 12 * (DIM // 2 + 8)
    assert spec("int4", static_tables(4)).bytes_per_token() == 12 * DIM // 2
    for dtype in ("float16", "int8"):
        assert KVCache(spec(dtype), num_blocks=3).nbytes == 3 * BLOCK * spec(dtype).bytes_per_token()


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
    scale = torch.full((LAYERS, HEADS), (high - low) / (2**bits - 1))
    zero = torch.full((LAYERS, HEADS), low)
    return KVScales(bits=bits, k_scale=scale, k_zero=zero, v_scale=scale * 2, v_zero=zero * 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_static_scales_quantize_with_the_calibrated_table(bits):
    tables = static_tables(bits)
    cache = KVCache(spec(f"int{bits}", tables), num_blocks=4)
    layer = cache.layers[1]
    assert layer.keys.meta is None and layer.values.meta is None
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
    with pytest.raises(LmcError, match=r"\[layers, kv_heads\] = \[2, 1\] but the model has \[2, 3\]"):
        spec("int8", wrong)


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
