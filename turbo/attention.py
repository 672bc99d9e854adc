"""Paged attention over a packed batch: Triton kernels on CUDA, a plain PyTorch reference elsewhere.

Sequence b's new queries sit at positions [num_computed[b], context_lens[b]); they
attend causally to all context_lens[b] tokens, whose K/V the layer has already
written to the cache, gathered through the sequence's block table.  Reading the
new tokens back from the cache (rather than using the fresh K/V) keeps results
independent of how a prompt is chunked, quantized KV included.

paged_attention_reference is the oracle the kernels (turbo/kernels/paged_attention.py)
are tested against; the kernel module imports triton, so it is imported only when
kernels.available() says the CUDA path can run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmcompress.turbo import kernels
from lmcompress.turbo.forward_batch import ForwardBatch
from lmcompress.turbo.kv_cache import LayerKVCache


def context_slots(block_table: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """[context_len] long: the cache slot of each position 0..context_len-1 of one sequence."""
    positions = torch.arange(context_len, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


def causal_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
    """query [q_len, H, D] are the last q_len of keys/values [ctx, Hkv, D]'s positions -> [q_len, H, D].

    Query head h reads KV head h // (H / Hkv), as grouped-query attention does.
    """
    q_len, ctx = query.shape[0], keys.shape[0]
    # Query i sits at position ctx - q_len + i and may see keys 0..ctx - q_len + i.
    allowed = torch.ones(q_len, ctx, dtype=torch.bool, device=query.device).tril(diagonal=ctx - q_len)
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
        attn_mask=allowed, scale=scale, enable_gqa=True,
    )
    return out.transpose(0, 1)


def paged_attention(query: torch.Tensor, cache: LayerKVCache, batch: ForwardBatch, scale: float) -> torch.Tensor:
    """query [T, H, D] of the packed batch -> attention output [T, H, D].

    On CUDA: the decode kernel when every sequence has one new token (batch.max_query_len
    == 1, the CUDA-graph step), else the prompt-chunk kernel.  Elsewhere, or for head
    sizes the kernels do not take, the reference.
    """
    if kernels.available(query.device):
        from lmcompress.turbo.kernels import paged_attention as attention_kernels

        if attention_kernels.supports(query.shape[-1]):
            if batch.max_query_len == 1:
                return attention_kernels.paged_decode_attention(query, cache, batch.block_tables, batch.seq_lens, scale)
            return attention_kernels.paged_prefill_attention(
                query, cache, batch.block_tables, batch.seq_lens, batch.query_start, batch.max_query_len, scale
            )
    return paged_attention_reference(query, cache, batch, scale)


def paged_attention_reference(query: torch.Tensor, cache: LayerKVCache, batch: ForwardBatch,
                              scale: float) -> torch.Tensor:
    """query [T, H, D] of the packed batch -> attention output [T, H, D], one sequence at a time (plain PyTorch)."""
    out = torch.empty_like(query)
    starts = batch.query_start_loc
    for seq, context_len in enumerate(batch.context_lens):
        rows = slice(starts[seq], starts[seq + 1])
        slots = context_slots(batch.block_tables[seq], context_len, batch.block_size)
        keys, values = cache.read(slots, query.dtype)
        out[rows] = causal_attention(query[rows], keys, values, scale)
    return out
