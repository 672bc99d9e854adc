"""One forward pass's input: new tokens of several sequences packed into one flat batch.

Each sequence contributes its new tokens, positions [num_computed, num_computed + q_len),
and attends causally to everything before them (already in the paged KV cache)
plus themselves.  The same layout serves a whole prompt, a prompt chunk, a
prefix-cache hit (num_computed > 0 on the first pass) and a one-token decode, so
all of them can share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

import numpy as np
import torch

from lmcompress.errors import LmcError
from lmcompress.turbo.transfer import to_device

# Which rows of a sequence's new tokens get logits: its last token (to sample the
# next one), every token (perplexity, prompt logprobs), or none (a mid-prompt chunk).
LogitsMode = Literal["last", "all", "none"]
LOGITS_MODES = ("last", "all", "none")
# Segments of a packed buffer start at multiples of 4 elements: 16 bytes of int32, 32 of int64.
_ALIGN_ELEMENTS = 4


# Built per sequence per step: slotted and unfrozen, a quarter of a frozen dataclass's construction time.
@dataclass(slots=True)
class SeqInput:
    """One sequence's share of a forward pass."""

    token_ids: Sequence[int]  # the new tokens, at positions [start, start + len(token_ids))
    start: int  # tokens already in the KV cache (num_computed_tokens)
    block_table: Sequence[int]  # KV block ids in token order; must cover start + len(token_ids) tokens
    logits: LogitsMode = "last"


@dataclass(frozen=True)
class ForwardBatch:
    """Packed inputs of B sequences with T new tokens in total.

    Per-token tensors are on the model's device; per-sequence counts are Python
    ints so the reference attention can slice without device syncs, and are also
    on the device (seq_lens, query_start) for the attention kernels.
    """

    input_ids: torch.Tensor  # [T] long
    positions: torch.Tensor  # [T] long: position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset, where each token's K/V is written
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0 (padding is never read)
    logits_indices: torch.Tensor  # [N] long: rows of the packed batch whose logits forward() returns, in order
    query_lens: tuple[int, ...]  # [B] new tokens per sequence
    num_computed: tuple[int, ...]  # [B] tokens already cached = position of each sequence's first new token
    logit_counts: tuple[int, ...]  # [B] logits rows per sequence: logits.split(logit_counts) gives each one's
    block_size: int
    seq_lens: torch.Tensor  # [B] int32: context_lens on the device (0 for a padding row of a CUDA graph)
    query_start: torch.Tensor  # [B + 1] int32: query_start_loc on the device
    max_query_len: int  # the most new tokens of any sequence; 1 = a pure decode step

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def context_lens(self) -> tuple[int, ...]:
        """[B] tokens each sequence attends to after this pass: cached + new."""
        return tuple(c + q for c, q in zip(self.num_computed, self.query_lens))

    @property
    def query_start_loc(self) -> tuple[int, ...]:
        """[B + 1] offsets of each sequence's first new token in the packed batch; the last is T."""
        return (0, *accumulate(self.query_lens))

    @classmethod
    def build(cls, seqs: Sequence[SeqInput], block_size: int, device: str | torch.device = "cpu") -> ForwardBatch:
        if not seqs:
            raise LmcError("a forward batch needs at least one sequence; schedule a request before calling forward")
        for index, seq in enumerate(seqs):
            _check_seq(index, seq, block_size)
        query_lens = tuple(len(seq.token_ids) for seq in seqs)
        decode = all(n == 1 and seq.logits == "last" for seq, n in zip(seqs, query_lens))
        rows = _decode_rows(seqs, block_size) if decode else _token_rows(seqs, block_size)
        return cls(
            **_device_tensors(seqs, query_lens, rows, device),
            query_lens=query_lens,
            num_computed=tuple(seq.start for seq in seqs),
            logit_counts=rows.logit_counts,
            block_size=block_size,
            max_query_len=max(query_lens),
        )


@dataclass
class _TokenRows:
    """The per-token lists of a batch (length T each) and its logits rows."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    logits_indices: list[int]
    logit_counts: tuple[int, ...]  # [B] logits rows per sequence


def _token_rows(seqs: Sequence[SeqInput], block_size: int) -> _TokenRows:
    """Any mix of prompt chunks and decodes."""
    input_ids, positions, slots, logits_indices, logit_counts = [], [], [], [], []
    for seq in seqs:
        first_row = len(input_ids)
        seq_positions = range(seq.start, seq.start + len(seq.token_ids))
        input_ids.extend(seq.token_ids)
        positions.extend(seq_positions)
        slots.extend(seq.block_table[p // block_size] * block_size + p % block_size for p in seq_positions)
        rows = _logit_rows(seq.logits, first_row, len(input_ids))
        logits_indices.extend(rows)
        logit_counts.append(len(rows))
    return _TokenRows(input_ids, positions, slots, logits_indices, tuple(logit_counts))


def _decode_rows(seqs: Sequence[SeqInput], block_size: int) -> _TokenRows:
    """The steady state, one new token per sequence with its logits: _token_rows in one pass per list."""
    positions = [seq.start for seq in seqs]
    return _TokenRows(
        input_ids=[seq.token_ids[0] for seq in seqs],
        positions=positions,
        slots=[seq.block_table[p // block_size] * block_size + p % block_size for seq, p in zip(seqs, positions)],
        logits_indices=list(range(len(seqs))),
        logit_counts=(1,) * len(seqs),
    )


def _device_tensors(seqs: Sequence[SeqInput], query_lens: Sequence[int], rows: _TokenRows,
                    device: str | torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors, as views of one int64 and one int32 buffer: two host-to-device copies
    however many sequences (on CUDA every torch.tensor(..., device=) is a blocking copy of its own)."""
    width = max(len(seq.block_table) for seq in seqs)
    input_ids, positions, slots, logits_indices = _packed(
        [rows.input_ids, rows.positions, rows.slots, rows.logits_indices], np.int64, device)
    seq_lens = [seq.start + n for seq, n in zip(seqs, query_lens)]
    tables, seq_lens_tensor, query_start = _packed(
        [_padded_tables(seqs, width), seq_lens, [0, *accumulate(query_lens)]], np.int32, device)
    return dict(input_ids=input_ids, positions=positions, slot_mapping=slots, logits_indices=logits_indices,
                block_tables=tables.view(len(seqs), width), seq_lens=seq_lens_tensor, query_start=query_start)


def _packed(segments: list[list[int]], dtype: type[np.integer], device: str | torch.device) -> list[torch.Tensor]:
    """Each segment as a 1-D tensor on `device`, all views of one buffer built through numpy (a third of
    torch.tensor(list)'s time) and copied at once, without waiting for the device (transfer.py).  Views
    start on 16-byte boundaries, where Triton's pointer specialisation wants them."""
    flat: list[int] = []
    bounds = []
    for values in segments:
        start = len(flat)
        flat += values
        flat += [0] * (-len(flat) % _ALIGN_ELEMENTS)
        bounds.append((start, start + len(values)))
    buffer = to_device(np.array(flat, dtype=dtype), torch.device(device))
    return [buffer[start:end] for start, end in bounds]


def _padded_tables(seqs: Sequence[SeqInput], width: int) -> list[int]:
    """Every block table padded with 0 to `width` entries, flattened row by row."""
    flat: list[int] = []
    for seq in seqs:
        flat += seq.block_table
        flat += [0] * (width - len(seq.block_table))
    return flat


def _logit_rows(mode: LogitsMode, first: int, end: int) -> range:
    if mode == "all":
        return range(first, end)
    if mode == "last":
        return range(end - 1, end)
    return range(0)


def _check_seq(index: int, seq: SeqInput, block_size: int) -> None:
    if len(seq.token_ids) == 0:
        raise LmcError(f"sequence {index} of the batch has no new tokens; schedule at least one token per sequence")
    if seq.start < 0:
        raise LmcError(f"sequence {index} starts at position {seq.start}; pass its num_computed_tokens (>= 0)")
    if seq.logits not in LOGITS_MODES:
        raise LmcError(f"sequence {index} asks for logits {seq.logits!r}; use one of {', '.join(LOGITS_MODES)}")
    needed = -(-(seq.start + len(seq.token_ids)) // block_size)
    if len(seq.block_table) < needed:
        raise LmcError(
            f"sequence {index} needs {needed} KV blocks of {block_size} tokens for "
            f"{seq.start + len(seq.token_ids)} tokens but its block table has {len(seq.block_table)}; "
            "allocate the blocks (BlockManager.allocate_slots) before the forward pass"
        )
