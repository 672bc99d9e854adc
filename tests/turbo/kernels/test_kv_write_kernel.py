"""The Triton write_kv against the pools' reference write: the same floats, codes and float16 scales, bit for bit.

CUDA only (run on the lent GPU); the reference itself is tested on the CPU in tests/turbo/test_kv_cache.py.
"""

from __future__ import annotations

import pytest
import torch

from lmcompress.calib.kv_stats import KVScales
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="write_kv is a Triton kernel: needs CUDA (run on the lent GPU)"),
]

NUM_BLOCKS, BLOCK = 8, 16


def static_tables(bits: int, heads: int, head_dim: int, per_channel: bool, gen: torch.Generator) -> KVScales:
    """Calibration-like tables for one layer: ranges a little narrower than the data, so some codes clamp."""
    shape = (1, heads, head_dim) if per_channel else (1, heads)
    low = -torch.rand(shape, generator=gen) * 2 - 0.5
    high = torch.rand(shape, generator=gen) * 2 + 0.5
    scale = (high - low) / (2**bits - 1)
    return KVScales(bits=bits, k_scale=scale, k_zero=low, v_scale=scale * 1.5, v_zero=low * 1.5)


def new_tokens(num_tokens: int, heads: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    """key, value [T, heads, head_dim] as the attention layer passes them: views into one fused qkv output."""
    qkv = torch.randn(num_tokens, 4 * heads * head_dim, generator=gen) * 1.3 + 0.2
    qkv[:, 2 * heads * head_dim + 7] = -25.0  # an outlier channel of K, as after RoPE
    qkv = qkv.to("cuda", dtype)
    _, key, value = qkv.split([2 * heads * head_dim, heads * head_dim, heads * head_dim], dim=-1)
    return key.view(num_tokens, heads, head_dim), value.view(num_tokens, heads, head_dim)


def pool_tensors(cache: KVCache) -> dict[str, torch.Tensor]:
    layer = cache.layers[0]
    return {f"{kind}.{name}": tensor for kind, pool in (("k", layer.keys), ("v", layer.values))
            for name in ("data", "meta") if (tensor := getattr(pool, name, None)) is not None}


CASES = [  # (KV dtype, static tables: None / "head" / "channel", dtype of the new K/V)
    ("float16", None, torch.float16), ("bfloat16", None, torch.bfloat16), ("float32", None, torch.float32),
    ("float16", None, torch.float32),
    ("int8", None, torch.float16), ("int4", None, torch.bfloat16), ("int4", None, torch.float32),
    ("int8", "channel", torch.bfloat16), ("int4", "channel", torch.float16), ("int4", "head", torch.float16),
]


@pytest.mark.parametrize("kv_dtype, static, x_dtype", CASES)
@pytest.mark.parametrize("heads, head_dim", [(2, 64), (8, 128)])
def test_write_kv_matches_the_reference_write(kv_dtype, static, x_dtype, heads, head_dim):
    from lmcompress.turbo.kernels.kv_write import write_kv

    gen = torch.Generator().manual_seed(heads * head_dim)
    tables = None
    if static is not None:
        tables = static_tables(int(kv_dtype[3:]), heads, head_dim, static == "channel", gen)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=heads, head_dim=head_dim, block_size=BLOCK, dtype=kv_dtype,
                       static_scales=tables)
    kernel, reference = KVCache(spec, NUM_BLOCKS, "cuda"), KVCache(spec, NUM_BLOCKS, "cuda")
    num_tokens = 37
    key, value = new_tokens(num_tokens, heads, head_dim, x_dtype, gen)
    slots = torch.randperm(NUM_BLOCKS * BLOCK, generator=gen)[:num_tokens]
    slots[[3, 17, 36]] = -1  # padding rows of a CUDA-graph batch
    slots = slots.cuda()
    key[3] = float("nan")  # a padding row's garbage must not reach the pool
    write_kv(kernel.layers[0], slots, key, value)
    reference.layers[0].write_reference(slots, key, value)
    got, expected = pool_tensors(kernel), pool_tensors(reference)
    for name in expected:
        assert torch.equal(got[name], expected[name]), f"{name} differs in {(got[name] != expected[name]).sum()} places"
    assert expected["k.data"].abs().sum() > 0


def test_layer_write_runs_the_kernel_on_cuda(monkeypatch):
    from lmcompress.turbo.kernels import kv_write

    calls = []
    monkeypatch.setattr(kv_write, "write_kv", lambda *args: calls.append(args))
    spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=64, block_size=BLOCK, dtype="int4")
    layer = KVCache(spec, NUM_BLOCKS, "cuda").layers[0]
    x = torch.randn(3, 2, 64, device="cuda")
    layer.write(torch.arange(3, device="cuda"), x, x)
    assert len(calls) == 1 and calls[0][0] is layer
