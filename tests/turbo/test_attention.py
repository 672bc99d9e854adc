"""Reference paged attention against dense causal attention written out with an explicit softmax."""

from __future__ import annotations

import torch

from lmcompress.turbo.attention import context_slots, paged_attention
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
