"""Decode-step CUDA graphs: bucket choice and padding on the CPU; replay against eager on CUDA."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lmcompress.turbo.cuda_graph import PAD_SLOT, DecodeBuffers, bucket_for, graph_batch_sizes, is_decode
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.model_runner import ModelRunner, RunnerOptions

BLOCK = 4


def test_bucket_sizes_end_at_max_num_seqs():
    assert graph_batch_sizes(5) == (1, 2, 4, 5)
    sizes = graph_batch_sizes(64)
    assert sizes[-1] == 64 and list(sizes) == sorted(set(sizes))
    assert [bucket_for(n, sizes) for n in (1, 3, 9, 64)] == [1, 4, 12, 64]
    assert bucket_for(65, sizes) is None


def decode_batch(lengths: list[int]) -> ForwardBatch:
    """One new token per sequence; sequence i holds lengths[i] tokens after it."""
    seqs = [SeqInput([7 + i], n - 1, list(range(10 * i, 10 * i + -(-n // BLOCK)))) for i, n in enumerate(lengths)]
    return ForwardBatch.build(seqs, BLOCK)


def test_a_batch_fills_the_first_rows_and_the_rest_is_padding():
    buffers = DecodeBuffers.allocate(max_seqs=8, max_blocks=6, device=torch.device("cpu"))
    buffers.load(decode_batch([5, 9, 14, 2, 3]), size=8)  # a larger batch first leaves stale rows
    batch = decode_batch([5, 9, 1])
    buffers.load(batch, size=4)
    view = buffers.batch(4, BLOCK)
    assert view.input_ids[:3].tolist() == [7, 8, 9]
    assert view.positions[:3].tolist() == [4, 8, 0]
    assert view.slot_mapping.tolist() == batch.slot_mapping.tolist() + [PAD_SLOT]
    assert view.seq_lens.tolist() == [5, 9, 1, 0]
    assert view.block_tables[1, :3].tolist() == [10, 11, 12]
    assert view.query_start.tolist() == [0, 1, 2, 3, 4] and view.logits_indices.tolist() == [0, 1, 2, 3]
    assert is_decode(view) and is_decode(batch)


def test_prompt_chunks_are_not_decode_steps():
    chunk = ForwardBatch.build([SeqInput([1, 2, 3], 0, [0]), SeqInput([4], 5, [1, 2])], BLOCK)
    assert not is_decode(chunk)
    no_logits = ForwardBatch.build([SeqInput([4], 5, [1, 2], "none")], BLOCK)
    assert not is_decode(no_logits)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the lent GPU)")
@pytest.mark.parametrize("kv_cache_dtype", ["float16", "int8", "int4"])
def test_replayed_decode_steps_match_eager(tmp_path, kv_cache_dtype):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    options = dict(device="cuda", dtype="float16", kv_cache_dtype=kv_cache_dtype, block_size=BLOCK, num_blocks=256,
                   max_num_seqs=16)
    graphed = ModelRunner(tmp_path, RunnerOptions(cuda_graphs=True, **options))
    eager = ModelRunner(tmp_path, RunnerOptions(cuda_graphs=False, **options))
    assert graphed.decode_graphs is not None and eager.decode_graphs is None
    rng = random.Random(0)
    for num_seqs in (1, 3, 16):
        lengths = [rng.randint(2, 60) for _ in range(num_seqs)]
        tables = [list(range(16 * i, 16 * i + 16)) for i in range(num_seqs)]
        prompts = [[rng.randrange(128) for _ in range(n)] for n in lengths]
        for runner in (graphed, eager):  # identical prompts into identical slots of both caches
            runner.forward(runner.build_batch([SeqInput(p[:-1], 0, t, "none") for p, t in zip(prompts, tables)]))
        decode = [SeqInput(p[-1:], len(p) - 1, t) for p, t in zip(prompts, tables)]
        got = graphed.forward(graphed.build_batch(decode))
        expected = eager.forward(eager.build_batch(decode))
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=2e-3)
