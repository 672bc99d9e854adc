"""Packing sequences into a ForwardBatch: positions, slots, block tables, logits rows, and bad input."""

from __future__ import annotations

import random

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput


def test_build_packs_prefill_chunk_and_decode():
    batch = ForwardBatch.build(
        [
            SeqInput([11, 12, 13], start=0, block_table=[9], logits="all"),
            SeqInput([21, 22], start=3, block_table=[4, 7]),  # a chunk crossing into its second block
            SeqInput([31], start=8, block_table=[2, 0, 5], logits="none"),  # a decode at position 8
        ],
        block_size=4,
    )
    assert batch.input_ids.tolist() == [11, 12, 13, 21, 22, 31]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 8]
    assert batch.slot_mapping.tolist() == [36, 37, 38, 19, 28, 20]
    assert batch.block_tables.tolist() == [[9, 0, 0], [4, 7, 0], [2, 0, 5]]
    assert batch.logits_indices.tolist() == [0, 1, 2, 4]
    assert batch.logit_counts == (3, 1, 0)
    assert batch.query_lens == (3, 2, 1) and batch.num_computed == (0, 3, 8)
    assert batch.context_lens == (3, 5, 9)
    assert batch.query_start_loc == (0, 3, 5, 6)
    assert (batch.num_seqs, batch.num_tokens) == (3, 6)
    # The same counts on the device, int32, for the attention kernels.
    assert batch.seq_lens.dtype == batch.query_start.dtype == torch.int32
    assert batch.seq_lens.tolist() == [3, 5, 9] and batch.query_start.tolist() == [0, 3, 5, 6]
    assert batch.max_query_len == 3


def test_a_decode_step_has_max_query_len_one():
    batch = ForwardBatch.build([SeqInput([4], 6, [0, 1]), SeqInput([5], 0, [2])], block_size=4)
    assert batch.max_query_len == 1
    assert batch.seq_lens.tolist() == [7, 1] and batch.query_start.tolist() == [0, 1, 2]


def test_a_decode_batch_packs_like_the_same_rows_in_a_mixed_batch():
    """Pure decode batches take a shortcut; one prompt chunk at the end sends the same rows the general way."""
    rng = random.Random(0)
    decodes = []
    for _ in range(20):
        start = rng.randrange(40)
        table = rng.sample(range(100), start // 4 + 1 + rng.randrange(2))  # covers start + 1, sometimes a spare block
        decodes.append(SeqInput([rng.randrange(1000)], start, table))
    width = max(len(seq.block_table) for seq in decodes)
    fast = ForwardBatch.build(decodes, block_size=4)
    mixed = ForwardBatch.build([*decodes, SeqInput([1, 2, 3], 0, [7])], block_size=4)
    n = len(decodes)
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices", "seq_lens"):
        assert getattr(fast, name).tolist() == getattr(mixed, name)[:n].tolist(), name
    assert fast.block_tables.tolist() == mixed.block_tables[:n, :width].tolist()
    assert fast.query_start.tolist() == mixed.query_start[: n + 1].tolist()
    assert (fast.query_lens, fast.num_computed, fast.logit_counts) == (
        mixed.query_lens[:n], mixed.num_computed[:n], mixed.logit_counts[:n])
    assert fast.max_query_len == 1 and mixed.max_query_len == 3


def test_batch_tensors_start_16_byte_aligned():
    """They share two buffers; Triton specialises kernels on pointers aligned to 16 bytes."""
    batch = ForwardBatch.build([SeqInput([1, 2, 3], 0, [5]), SeqInput([4], 6, [1, 2], "all")], block_size=4)
    for name in ("input_ids", "positions", "slot_mapping", "logits_indices", "block_tables", "seq_lens", "query_start"):
        assert getattr(batch, name).data_ptr() % 16 == 0, name


@pytest.mark.parametrize(
    "seq, message",
    [
        (SeqInput([], 0, [0]), "has no new tokens"),
        (SeqInput([1], -1, [0]), "starts at position -1"),
        (SeqInput([1], 0, [0], logits="first"), "asks for logits 'first'"),
        (SeqInput([1, 2], 3, [0]), "needs 2 KV blocks of 4 tokens for 5 tokens but its block table has 1"),
    ],
)
def test_build_rejects_bad_sequences(seq, message):
    with pytest.raises(LmcError, match=message):
        ForwardBatch.build([SeqInput([5], 0, [1]), seq], block_size=4)


def test_build_rejects_empty_batch():
    with pytest.raises(LmcError, match="at least one sequence"):
        ForwardBatch.build([], block_size=4)
