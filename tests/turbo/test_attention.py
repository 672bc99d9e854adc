"""Reference paged attention against dense causal attention written out with an explicit softmax; CUDA dispatch."""

from __future__ import annotations

import pytest
import torch

from lmcompress.turbo.attention import context_slots, paged_attention, paged_attention_reference
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec

HEADS, KV_HEADS, DIM, BLOCK, NUM_BLOCKS = 6, 2, 8, 4, 32


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_position: int) -> torch.Tensor:
    """q [n, H, D] at positions first_position.., k/v [ctx, Hkv, D] -> [n, H, D], head h reading KV head h // 3."""
    out = torch.empty_like(q)
    for i in range(q.shape[0]):
        visible = first_position + i + 1
        for h in range(HEADS):
            kv_head = h // (HEADS // KV_HEADS)
            weights = torch.softmax(k[:visible, kv_head] @ q[i, h] / DIM**0.5, dim=0)
            out[i, h] = weights @ v[:visible, kv_head]
    return out


def test_context_slots_follow_the_block_table():
    table = torch.tensor([7, 2, 5], dtype=torch.int32)
    assert context_slots(table, 10, BLOCK).tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21]


def test_paged_attention_matches_dense_for_prefill_chunk_and_decode():
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(KVCacheSpec(num_layers=1, num_kv_heads=KV_HEADS, head_dim=DIM, block_size=BLOCK, dtype="float32"), NUM_BLOCKS)
    layer = cache.layers[0]
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    # (context length, new tokens): a whole prompt, a chunk after 6 cached tokens, a decode, a chunk at a block edge.
    shapes = [(9, 9), (11, 5), (14, 1), (12, 4)]
    full_keys = [torch.randn(ctx, KV_HEADS, DIM, generator=gen) for ctx, _ in shapes]
    full_values = [torch.randn(ctx, KV_HEADS, DIM, generator=gen) for ctx, _ in shapes]
    tables = [[free.pop() for _ in range(-(-ctx // BLOCK))] for ctx, _ in shapes]
    batch = ForwardBatch.build(
        [SeqInput([0] * new, ctx - new, table) for (ctx, new), table in zip(shapes, tables)], BLOCK
    )
    # What earlier passes cached, then the new tokens' K/V as the layer writes them.
    for (ctx, new), table, k, v in zip(shapes, tables, full_keys, full_values):
        cached = context_slots(torch.tensor(table), ctx - new, BLOCK)
        layer.write(cached, k[: ctx - new], v[: ctx - new])
    new_keys = torch.cat([k[ctx - new:] for (ctx, new), k in zip(shapes, full_keys)])
    new_values = torch.cat([v[ctx - new:] for (ctx, new), v in zip(shapes, full_values)])
    layer.write(batch.slot_mapping, new_keys, new_values)

    query = torch.randn(batch.num_tokens, HEADS, DIM, generator=gen)
    out = paged_attention(query, layer, batch, scale=DIM**-0.5)
    starts = batch.query_start_loc
    for seq, ((ctx, new), k, v) in enumerate(zip(shapes, full_keys, full_values)):
        rows = slice(starts[seq], starts[seq + 1])
        expected = dense_attention(query[rows], k, v, first_position=ctx - new)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the kernel dispatch needs CUDA (run on the lent GPU)")
@pytest.mark.parametrize("kv_dtype", ["float16", "int4"])
def test_cuda_dispatches_decode_steps_and_chunks_to_the_kernels(monkeypatch, kv_dtype):
    import lmcompress.turbo.kernels.paged_attention as kernels

    calls = []
    for name in ("paged_decode_attention", "paged_prefill_attention"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    gen = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, block = 8, 2, 64, 16
    spec = KVCacheSpec(num_layers=1, num_kv_heads=kv_heads, head_dim=dim, block_size=block, dtype=kv_dtype)
    layer = KVCache(spec, 16, "cuda").layers[0]
    tables = [[3, 9, 4], [0, 12]]
    for table in tables:  # random K/V at every position the batches below attend to
        slots = context_slots(torch.tensor(table), block * len(table), block).cuda()
        keys, values = (torch.randn(len(slots), kv_heads, dim, generator=gen).to("cuda", torch.float16) for _ in "kv")
        layer.write(slots, keys, values)
    for seqs, kernel in (([SeqInput([0] * 20, 15, tables[0]), SeqInput([0], 20, tables[1])], "paged_prefill_attention"),
                         ([SeqInput([0], 40, tables[0]), SeqInput([0], 21, tables[1])], "paged_decode_attention")):
        batch = ForwardBatch.build(seqs, block, "cuda")
        shape = (batch.num_tokens, kv_heads, dim)
        keys, values = (torch.randn(shape, generator=gen).to("cuda", torch.float16) for _ in range(2))
        layer.write(batch.slot_mapping, keys, values)
        query = torch.randn(batch.num_tokens, heads, dim, generator=gen).to("cuda", torch.float16)
        got = paged_attention(query, layer, batch, dim**-0.5)
        assert calls[-1] == kernel
        torch.testing.assert_close(got, paged_attention_reference(query, layer, batch, dim**-0.5), atol=4e-3, rtol=4e-3)
