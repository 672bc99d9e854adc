"""The Triton paged attention kernels against paged_attention_reference, on random KV (never zeros).

Decode (one query per sequence, flash-decoding partitions, padded rows) and prompt
chunks (whole prompts, chunks after cached tokens, prefix hits) over float, int8 and
int4 KV, dynamic and static, GQA and MHA, head_dim 64 and 128, KV blocks of 16 and 64.
CUDA only (the lent GPU); one CPU test runs tiny shapes under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmcompress.calib.kv_stats import KVScales
from lmcompress.turbo.attention import context_slots, paged_attention_reference
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec, LayerKVCache

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels: need CUDA (run on the lent GPU)")

KINDS = [  # (KV dtype, static tables: None / "head" / "channel", query dtype)
    ("float16", None, torch.float16), ("bfloat16", None, torch.bfloat16), ("float32", None, torch.float32),
    ("int8", None, torch.float16), ("int4", None, torch.bfloat16), ("int4", None, torch.float32),
    ("int8", "channel", torch.bfloat16), ("int4", "channel", torch.float16), ("int4", "head", torch.float16),
]
HEADS = [(8, 2), (4, 4)]  # (query heads, KV heads): GQA (tl.dot path) and MHA (CUDA-core path)
SHAPES = [(64, 16), (128, 64)]  # (head_dim, KV block size)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def static_tables(bits: int, heads: int, head_dim: int, per_channel: bool, gen: torch.Generator) -> KVScales:
    shape = (1, heads, head_dim) if per_channel else (1, heads)
    low = -torch.rand(shape, generator=gen) * 3 - 2
    high = torch.rand(shape, generator=gen) * 3 + 2
    scale = (high - low) / (2**bits - 1)
    return KVScales(bits=bits, k_scale=scale, k_zero=low, v_scale=scale, v_zero=low)


def filled_layer(kv_dtype: str, static: str | None, kv_heads: int, head_dim: int, block_size: int,
                 contexts: list[int], dtype: torch.dtype, gen: torch.Generator) -> tuple[LayerKVCache, list[list[int]]]:
    """A pool with random K/V at every position of each sequence, over shuffled blocks; and the block tables."""
    tables = None if static is None else static_tables(int(kv_dtype[3:]), kv_heads, head_dim, static == "channel", gen)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                       dtype=kv_dtype, static_scales=tables)
    counts = [-(-n // block_size) for n in contexts]
    num_blocks = sum(counts) + 3
    layer = KVCache(spec, num_blocks, "cuda").layers[0]
    free = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = [[free.pop() for _ in range(count)] for count in counts]
    for length, table in zip(contexts, block_tables):
        slots = context_slots(torch.tensor(table), length, block_size).cuda()
        keys, values = ((torch.randn(length, kv_heads, head_dim, generator=gen) * 1.5 + 0.3).to("cuda", dtype)
                        for _ in range(2))
        layer.write_reference(slots, keys, values)
    return layer, block_tables


def assert_close(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_dtype, static, dtype", KINDS)
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("head_dim, block_size", SHAPES)
def test_decode_matches_the_reference(kv_dtype, static, dtype, heads, kv_heads, head_dim, block_size):
    from lmcompress.turbo.kernels.paged_attention import decode_launch, paged_decode_attention

    gen = torch.Generator().manual_seed(head_dim + heads)
    contexts = [1, 17, 64, 200, 333]  # a first token, lengths off and on block edges, long enough to split
    layer, tables = filled_layer(kv_dtype, static, kv_heads, head_dim, block_size, contexts, dtype, gen)
    batch = ForwardBatch.build([SeqInput([0], n - 1, t) for n, t in zip(contexts, tables)], block_size, "cuda")
    query = torch.randn(len(contexts), heads, head_dim, generator=gen).to("cuda", dtype)
    scale = head_dim**-0.5
    expected = paged_attention_reference(query, layer, batch, scale)

    # Two padding rows of a CUDA-graph bucket: seq_len 0, an all-zero block table row.
    padded_query = torch.cat([query, torch.randn(2, heads, head_dim, generator=gen).to("cuda", dtype)])
    padded_tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables[:2])])
    padded_lens = torch.cat([batch.seq_lens, torch.zeros_like(batch.seq_lens[:2])])
    launch = decode_launch(len(padded_lens), layer, heads // kv_heads, dtype,
                           padded_tables.shape[1] * block_size, query.device)
    assert launch.partitions > 1  # a few sequences: the split over partitions and the merge kernel
    for this in (launch, dataclasses.replace(launch, partitions=1)):
        out = paged_decode_attention(padded_query, layer, padded_tables, padded_lens, scale, this)
        assert_close(out[: len(contexts)], expected, dtype)
        assert torch.equal(out[len(contexts):], torch.zeros_like(out[len(contexts):]))


@pytest.mark.parametrize("batch, kv_heads, group, kv_dtype, expected", [
    (1, 32, 1, "bfloat16", (32, 16, 2)),  # 32 programs from the sequence: run AJ's grid for few sequences
    (4, 32, 1, "int8", (32, 4, 2)),
    (16, 32, 1, "bfloat16", (16, 2, 4)),  # 512 programs: run D's split
    (64, 32, 1, "int8", (16, 1, 4)),  # 2,048 programs fill the GPU: no split, warps by KV bits (run AD)
    (64, 32, 1, "int4", (16, 1, 1)),
    (1, 8, 4, "bfloat16", (64, 64, 4)),  # GQA: tl.dot tiles
])
def test_decode_launch_by_how_many_programs_the_sequences_give(monkeypatch, batch, kv_heads, group, kv_dtype,
                                                              expected):
    pytest.importorskip("triton")
    from lmcompress.turbo.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "sm_count", lambda device: 132)  # the H200's
    spec = KVCacheSpec(num_layers=1, num_kv_heads=kv_heads, head_dim=128, block_size=64, dtype=kv_dtype)
    layer = KVCache(spec, 4, torch.device("cpu")).layers[0]
    launch = paged_attention.decode_launch(batch, layer, group, torch.bfloat16, 32768, torch.device("cpu"))
    assert (launch.block_n, launch.partitions, launch.num_warps) == expected


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kv_dtype, static, dtype", KINDS)
@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("head_dim, block_size", SHAPES)
def test_prefill_matches_the_reference(kv_dtype, static, dtype, heads, kv_heads, head_dim, block_size):
    from lmcompress.turbo.kernels.paged_attention import paged_prefill_attention

    gen = torch.Generator().manual_seed(3 * head_dim + heads)
    # (context, new tokens): a whole prompt, a prefix hit (163 cached), a full block, a decode
    # riding in the same batch, a chunk after cached tokens, a one-token prompt.
    shapes = [(9, 9), (200, 37), (64, 64), (130, 1), (77, 20), (1, 1)]
    contexts = [n for n, _ in shapes]
    layer, tables = filled_layer(kv_dtype, static, kv_heads, head_dim, block_size, contexts, dtype, gen)
    batch = ForwardBatch.build([SeqInput([0] * new, n - new, t) for (n, new), t in zip(shapes, tables)],
                               block_size, "cuda")
    query = torch.randn(batch.num_tokens, heads, head_dim, generator=gen).to("cuda", dtype)
    scale = head_dim**-0.5
    out = paged_prefill_attention(query, layer, batch.block_tables, batch.seq_lens, batch.query_start,
                                  batch.max_query_len, scale)
    assert_close(out, paged_attention_reference(query, layer, batch, scale), dtype)


INTERPRETED = """
import torch
from lmcompress.turbo.attention import context_slots, paged_attention_reference
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.kernels.kv_write import write_kv
from lmcompress.turbo.kernels.paged_attention import DecodeLaunch, paged_decode_attention
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec

gen = torch.Generator().manual_seed(0)
spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, block_size=4, dtype="int4")
kernel, reference = KVCache(spec, 8).layers[0], KVCache(spec, 8).layers[0]
contexts, tables = [7, 13], [[5, 0], [2, 7, 1, 4]]
slots = torch.cat([context_slots(torch.tensor(t), n, 4) for n, t in zip(contexts, tables)])
keys, values = (torch.randn(len(slots), 2, 16, generator=gen) + 0.5 for _ in range(2))
write_kv(kernel, slots, keys, values)
reference.write_reference(slots, keys, values)
assert torch.equal(kernel.keys.data, reference.keys.data) and torch.equal(kernel.values.data, reference.values.data)
torch.testing.assert_close(kernel.values.meta, reference.values.meta, atol=0, rtol=1e-3)
batch = ForwardBatch.build([SeqInput([0], n - 1, t) for n, t in zip(contexts, tables)], 4)
query = torch.randn(2, 2, 16, generator=gen)
tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables[:1])])
lens = torch.cat([batch.seq_lens, torch.zeros_like(batch.seq_lens[:1])])
out = paged_decode_attention(torch.cat([query, query[:1]]), reference, tables, lens, 0.25,
                             DecodeLaunch(block_n=8, partitions=2, num_warps=4, num_stages=1))
torch.testing.assert_close(out[:2], paged_attention_reference(query, reference, batch, 0.25), atol=1e-5, rtol=1e-5)
assert not out[2].any()
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="TRITON_INTERPRET needs the triton package")
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check of the kernel logic; the GPU runs the compiled "
                    "kernel tests (the GPU image's triton 3.6 interpreter fails on this script: TypeError, run L2)")
def test_kernels_under_the_triton_interpreter(tmp_path):
    """write_kv and the decode kernel (int4, split in two partitions, a padding row) on the CPU, in numpy."""
    script = tmp_path / "interpreted.py"
    script.write_text(textwrap.dedent(INTERPRETED))
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
