"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step (every sequence adds one token) launches several hundred small
kernels; at small batch their CPU launch cost exceeds their GPU time.  Capturing
the whole Decoder forward once per bucket and replaying it costs one launch.

Graphs read fixed buffers, so a batch of B sequences goes into the first B rows
of the smallest bucket >= B.  Padding rows write no KV (slot -1) and attend to
nothing (seq_len 0); their logits are dropped.  Only the Triton path (kernels
that read lengths from device tensors, never from Python) can be captured.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.turbo.forward_batch import ForwardBatch
from lmcompress.turbo.kv_cache import KVCache

# Batch sizes with a captured graph (capped at max_num_seqs): dense where decode batches are
# small and latency matters, coarser above; a batch pads to the next size (at most ~33% waste).
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256)
PAD_SLOT = -1  # KV writes to negative slots are skipped


def graph_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The bucket sizes for an engine running at most max_num_seqs sequences."""
    return (*(size for size in GRAPH_BATCH_SIZES if size < max_num_seqs), max_num_seqs)


def bucket_for(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest bucket holding num_seqs sequences, or None when none does."""
    index = bisect.bisect_left(sizes, num_seqs)
    return sizes[index] if index < len(sizes) else None


def is_decode(batch: ForwardBatch) -> bool:
    """Every sequence adds one token and wants its logits: the step graphs replay."""
    return batch.max_query_len == 1 and len(batch.logits_indices) == batch.num_seqs


@dataclass
class DecodeBuffers:
    """The fixed inputs every graph reads; row i is sequence i of the batch (or padding)."""

    input_ids: torch.Tensor  # [max_seqs] long
    positions: torch.Tensor  # [max_seqs] long
    slot_mapping: torch.Tensor  # [max_seqs] long
    block_tables: torch.Tensor  # [max_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [max_seqs] int32
    query_start: torch.Tensor  # [max_seqs + 1] int32: arange, one token per sequence
    logits_indices: torch.Tensor  # [max_seqs] long: arange

    @classmethod
    def allocate(cls, max_seqs: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(
            input_ids=zeros(max_seqs),
            positions=zeros(max_seqs),
            slot_mapping=torch.full((max_seqs,), PAD_SLOT, dtype=torch.long, device=device),
            block_tables=zeros(max_seqs, max_blocks, dtype=torch.int32),
            seq_lens=zeros(max_seqs, dtype=torch.int32),
            query_start=torch.arange(max_seqs + 1, dtype=torch.int32, device=device),
            logits_indices=torch.arange(max_seqs, device=device),
        )

    @property
    def max_blocks(self) -> int:
        return self.block_tables.shape[1]

    def load(self, batch: ForwardBatch, size: int) -> None:
        """Copy a decode batch into rows [0, B) and mark rows [B, size) as padding."""
        num_seqs, width = batch.num_seqs, batch.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(batch.positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(batch.slot_mapping, non_blocking=True)
        self.block_tables[:num_seqs, :width].copy_(batch.block_tables, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(batch.seq_lens, non_blocking=True)
        self.pad(num_seqs, size)

    def pad(self, start: int, end: int) -> None:
        """Rows [start, end) write no KV and attend to nothing."""
        self.slot_mapping[start:end].fill_(PAD_SLOT)
        self.seq_lens[start:end].zero_()

    def batch(self, size: int, block_size: int) -> ForwardBatch:
        """A ForwardBatch over the first `size` rows, as the graph of that size sees it."""
        return ForwardBatch(
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            logits_indices=self.logits_indices[:size],
            query_lens=(1,) * size,
            # Unknown at capture time; only the reference attention reads these, never in a graph.
            num_computed=(0,) * size,
            logit_counts=(1,) * size,
            block_size=block_size,
            seq_lens=self.seq_lens[:size],
            query_start=self.query_start[: size + 1],
            max_query_len=1,
        )


class DecodeGraphs:
    """Captured decode forwards of `model` over `kv_cache`, one per bucket size."""

    def __init__(self, model: nn.Module, kv_cache: KVCache, max_num_seqs: int, max_blocks: int):
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.block_size = kv_cache.spec.block_size
        device = next(model.buffers()).device
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], max_blocks, device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool memory
            self._graphs[size] = self._capture(size)

    @torch.inference_mode()
    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        from lmcompress.turbo.kernels.pdl import graph_launches  # imports triton: CUDA only

        self.buffers.pad(0, size)
        batch = self.buffers.batch(size, self.block_size)
        with graph_launches():  # kernels launch with PDL where they can (kernels/pdl.py)
            self.model(batch, self.kv_cache)  # eager warm-up: compiles the Triton kernels for these shapes
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self.model(batch, self.kv_cache)  # [size, vocab]
        return graph, logits

    def fits(self, batch: ForwardBatch) -> bool:
        return (is_decode(batch) and batch.num_seqs <= self.sizes[-1]
                and batch.block_tables.shape[1] <= self.buffers.max_blocks)

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] of a decode batch; valid until the next run()."""
        size = bucket_for(batch.num_seqs, self.sizes)
        self.buffers.load(batch, size)
        graph, logits = self._graphs[size]
        graph.replay()
        return logits[: batch.num_seqs]
