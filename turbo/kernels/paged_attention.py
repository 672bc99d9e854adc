"""Paged attention in Triton: decode (flash-decoding over the block table) and prompt chunks (flash attention).

The oracle is turbo/attention.py paged_attention_reference.  Slot s of a pool is
token s % block_size of KV block s // block_size; a program gathers a tile of
BLOCK_N positions at a time through the sequence's block table (tiles need not
align with KV blocks).

Quantized KV is never dequantized into a tile of K/V values.  With codes c:
    dynamic (per token n: scale s_n, zero z_n, float16 in meta)
        q . k_n       = s_n (q . c_n) + z_n sum(q)
        sum_n p_n v_n = sum_n (p_n s_n) c_n + sum_n p_n z_n
    static (per channel d: s_d, z_d, the layer's [heads, head_dim] tables)
        q . k_n       = (q * s) . c_n + q . z     (the same for every key: softmax drops it)
        sum_n p_n v_n = s * (sum_n p_n c_n) + z * sum_n p_n
so scales and zeros cost O(tokens) or O(head_dim) per program, and a code costs
about one integer op (see "Tiles") and two multiply-adds, as a float16 element does:
int8 and int4 KV read 2x and 3.8x fewer bytes without becoming compute-bound.

Two ways to multiply, picked by the GQA group size G (query heads per KV head):
- G == 1 (decode of Llama-2-7B): CUDA-core multiply-adds over a [BLOCK_N, head_dim]
  tile, each tile row its own online-softmax stream (merged after the loop), the
  next tile's loads issued before the current tile is used (_attend_one).
- G > 1: the group's query heads are the rows of a tl.dot (padded to 16), so each
  KV tile is read once for all of them (_attend_rows).
Prompt chunks use _attend_rows with BLOCK_M query tokens of one head as the rows.

Decode splits each sequence into `partitions` contiguous ranges of tiles (flash-
decoding): grid (kv_heads, partitions, batch), sized from shapes only (batch,
heads, block-table width), never from seq_lens' values, so the step can be captured
in a CUDA graph.  Range bounds come from seq_lens inside the kernel; a second
kernel merges the partitions' (acc, max, sum).  With one partition the first
kernel writes the output itself.  KV heads vary fastest in the grid, so the heads
of one token, whose K/V and float16 meta share DRAM sectors, are read close in time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmcompress.errors import LmcError
from lmcompress.turbo.kernels import MAGIC_BITS, sm_count
from lmcompress.turbo.kernels.kv_write import pool_kind, supports
from lmcompress.turbo.kernels.pdl import enter_after_producers, pdl_launch
from lmcompress.turbo.kv_cache import LayerKVCache, QuantKVPool

__all__ = ["DecodeLaunch", "decode_launch", "paged_decode_attention", "paged_prefill_attention", "supports"]

LOG2E = 1.4426950408889634
# Decode launch without GQA: 16 positions a tile (each tile row keeps its own accumulator, so smaller tiles hold
# fewer registers a thread).  With at least _UNSPLIT_PROGRAMS_PER_SM programs an SM from sequences x KV heads
# alone, one partition a sequence and the warps of _WARPS_WITHOUT_GQA (by KV bits; None: a float pool): run AD
# (tests/gpu/attention_sweep.py, H200, Llama-2-7B heads) measured batches of 32-128 at 192-1152 positions 4-35 %
# faster so than with 32-64 positions a tile and 4 warps, and every split slower.  Fewer sequences split into
# partitions up to _PROGRAMS_PER_SM programs an SM, at 4 warps: the grid that read 88-97 % of the copy bandwidth at
# long contexts in run D (run AE's 2 programs an SM at 2 warps read 53 % at 1 x 32k).  Sequences x KV heads
# fewer than the SMs (batch 1-4 of Llama-2-7B) split to _FEW_PROGRAMS_PER_SM at 32 positions a tile and 2 warps:
# run AJ (L2 flushed, 32k-token tables) measured batch 1 at 192-384 positions 8.6-9.8 us against 12.8-13.0 (bf16
# and int8 alike), at 4,096 26.1 / 19.7 us against 31.4 / 22.6 (bf16 / int8), at 32,768 143.0 / 96.9 against
# 164.8 / 94.3.
_UNSPLIT_PROGRAMS_PER_SM = 4
_PROGRAMS_PER_SM = 8
_FEW_PROGRAMS_PER_SM = 4
_MAX_PARTITIONS = 64
_WARPS_WITHOUT_GQA = {None: 2, 8: 4, 4: 1}


# ----------------------------------------------------------------------------------------------
# Tiles
#
# Codes are read as int32 words (4 int8 or 8 int4 codes; channel = word * PER_WORD + lane)
# and become floats without a shift or conversion per code: lane i's bits, masked in place
# and OR-ed into the mantissa of MAGIC = 2**23, give the float MAGIC + code * 2**e(i), exactly,
# e(i) = BITS * i, for the lanes whose bits sit below the exponent (int8: 2, int4: 5); the
# other lanes come the same way from the word shifted right once.  So a code costs one LOP3
# (plus 1/8 or 1/4 shift per word), and (F - MAGIC) * 2**-e(i) is the exact code.  The
# kernels get MAGIC's bits (MAGIC_BITS) as an argument, `magic`: a LOP3 takes one immediate, so
# with both the mask and MAGIC as constants ptxas would spend two instructions per code.


@triton.jit
def _masked_float(src, magic, SHIFT: tl.constexpr, MASK: tl.constexpr):
    """The code at bits SHIFT.. of src, as the float 2**23 + code * 2**SHIFT."""
    return ((src & (MASK << SHIFT)) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _lanes_int8(words, magic):
    """[N, D/4] int32 -> [N, D] float32 2**23 + code * 2**e, channel 4j + i of byte i of word j."""
    high = words >> 16
    b0 = _masked_float(words, magic, 0, 0xFF)
    b1 = _masked_float(words, magic, 8, 0xFF)
    b2 = _masked_float(high, magic, 0, 0xFF)
    b3 = _masked_float(high, magic, 8, 0xFF)
    # tl.join adds a last axis held within a thread, so the joins and the reshape move no data:
    # [N, D/4, 2, 2] flattens its last two axes as 2a + b, and element (a, b) is byte 2a + b.
    runs = tl.join(tl.join(b0, b2), tl.join(b1, b3))
    return tl.reshape(runs, (words.shape[0], words.shape[1] * 4))


@triton.jit
def _lanes_int4(words, magic):
    """[N, D/8] int32 -> [N, D] float32 2**23 + code * 2**e, channel 8j + i of nibble i of word j (pack_nibbles)."""
    high = words >> 20
    c0 = _masked_float(words, magic, 0, 0xF)
    c1 = _masked_float(words, magic, 4, 0xF)
    c2 = _masked_float(words, magic, 8, 0xF)
    c3 = _masked_float(words, magic, 12, 0xF)
    c4 = _masked_float(words, magic, 16, 0xF)
    c5 = _masked_float(high, magic, 0, 0xF)
    c6 = _masked_float(high, magic, 4, 0xF)
    c7 = _masked_float(high, magic, 8, 0xF)
    # [N, D/8, 2, 2, 2] flattens its last three axes as 4a + 2b + c: element (a, b, c) is nibble 4a + 2b + c.
    runs = tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))
    return tl.reshape(runs, (words.shape[0], words.shape[1] * 8))


@triton.jit
def _lane_scale(BITS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """[D] float32 2**-e of each channel's lane (1 for a float pool), built from bits: exact."""
    if BITS == 0:
        return tl.full((HEAD_DIM,), 1.0, tl.float32)
    else:
        in_place: tl.constexpr = (23 - BITS) // BITS + 1  # lanes read without the shift
        lane = tl.arange(0, HEAD_DIM) % (32 // BITS)
        exponent = BITS * tl.where(lane < in_place, lane, lane - in_place)
        return ((127 - exponent) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _as_float(raw, magic, BITS: tl.constexpr):
    """A loaded tile [N, W] -> [N, D] float32: the values of a float pool, else 2**23 + code * 2**e."""
    if BITS == 0:
        return raw.to(tl.float32)
    elif BITS == 8:
        return _lanes_int8(raw, magic)
    else:
        return _lanes_int4(raw, magic)


@triton.jit
def _exact(x, lane_scale, BITS: tl.constexpr):
    """_as_float's tile -> the stored values, or the codes as float32 (one fused multiply-add, exact)."""
    if BITS == 0:
        return x
    else:
        return tl.fma(x, lane_scale[None, :], (-8388608.0 * lane_scale)[None, :])


@triton.jit
def _fetch(data, meta, table_row, tile, limit, kv_head, stride_slot, stride_meta_slot,
           BITS: tl.constexpr, DYNAMIC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
           BLOCK_SIZE: tl.constexpr):
    """Tile `tile` of one KV head's K or V, positions < limit -> (raw [N, W], scale [N], zero [N], valid [N]).

    raw: the pool's elements (float pools) or int32 words of codes; scale, zero: the tokens'
    float16 meta as float32 when DYNAMIC, else unused zeros.  stride_meta_slot counts
    (scale, zero) pairs.
    """
    positions = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = positions < limit
    blocks = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0)
    slots = blocks.to(tl.int64) * BLOCK_SIZE + positions % BLOCK_SIZE
    width: tl.constexpr = HEAD_DIM if BITS == 0 else HEAD_DIM * BITS // 32
    if BITS == 0:
        base = data
    else:
        base = data.to(tl.pointer_type(tl.int32))
    items = tl.arange(0, width)[None, :]
    raw = tl.load(base + slots[:, None] * stride_slot + kv_head * width + items, mask=valid[:, None], other=0)
    scale = tl.zeros((BLOCK_N,), tl.float32)
    zero = tl.zeros((BLOCK_N,), tl.float32)
    if DYNAMIC:
        # One int32 per token: float16 scale in the low half, zero in the high half.
        pair = tl.load(meta.to(tl.pointer_type(tl.int32)) + slots * stride_meta_slot + kv_head, mask=valid, other=0)
        scale = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        zero = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return raw, scale, zero, valid


# ----------------------------------------------------------------------------------------------
# The loops: queries against a range of KV tiles of one sequence, online softmax in base 2


@triton.jit
def _attend_rows(q, q_positions, k_data, v_data, k_meta, v_meta, table_row, seq_len, tile_lo, tile_hi, kv_head,
                 scale_log2, magic, stride_slot, stride_meta_slot,
                 BITS: tl.constexpr, DYNAMIC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Query rows q [R, D] (R >= 16) at q_positions [R] against KV tiles [tile_lo, tile_hi) of one sequence, causally.

    q is in the compute dtype, already multiplied by static K channel scales; both
    products run on tensor cores (tl.dot), the codes converted to q's dtype exactly.
    Returns (acc [R, D], m [R], l [R]) in base 2: weights p = 2**(score - m),
    l = sum p, acc = sum p v with V's dynamic zeros but not V's static tables.
    """
    rows: tl.constexpr = q.shape[0]
    m = tl.full((rows,), float("-inf"), tl.float32)
    l = tl.zeros((rows,), tl.float32)
    acc = tl.zeros((rows, HEAD_DIM), tl.float32)
    acc_zero = tl.zeros((rows,), tl.float32)  # sum p z of dynamic V
    q_sum = tl.sum(q.to(tl.float32), axis=1)  # [R], times dynamic K zeros
    lane_scale = _lane_scale(BITS, HEAD_DIM)
    for tile in range(tile_lo, tile_hi):
        k_raw, k_scale, k_zero, in_seq = _fetch(k_data, k_meta, table_row, tile, seq_len, kv_head, stride_slot,
                                                stride_meta_slot, BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
        v_raw, v_scale, v_zero, in_seq = _fetch(v_data, v_meta, table_row, tile, seq_len, kv_head, stride_slot,
                                                stride_meta_slot, BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
        k = _exact(_as_float(k_raw, magic, BITS), lane_scale, BITS).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [R, N]
        if DYNAMIC:
            s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        positions = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        visible = in_seq[None, :] & (positions[None, :] <= q_positions[:, None])
        s = tl.where(visible, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if DYNAMIC:
            acc_zero = acc_zero * alpha + tl.sum(p * v_zero[None, :], axis=1)
            p = p * v_scale[None, :]
        v = _exact(_as_float(v_raw, magic, BITS), lane_scale, BITS).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return acc + acc_zero[:, None], m, l


@triton.jit
def _attend_one(q, k_data, v_data, k_meta, v_meta, table_row, seq_len, tile_lo, tile_hi, kv_head,
                scale_log2, magic, stride_slot, stride_meta_slot,
                BITS: tl.constexpr, DYNAMIC: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
    """_attend_rows for the single query q [D] float32 of a decode step without GQA, on the CUDA cores.

    Each of the BLOCK_N rows of a tile keeps its own online softmax (m, l [N], acc [N, D]),
    merged once after the loop: no reduction across threads per tile but the score's
    sum over head_dim, and no shared memory.  V codes enter acc through one fused
    multiply-add, p * (F - 2**23) = fma(p, F, -p * 2**23) (exact before its one rounding),
    so acc is in units of code * 2**e until the lane scales at the end.  The next tile's
    loads are issued before the current one is used, doubling the bytes in flight.
    Returns (acc [1, D], m [1], l [1]).
    """
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    acc_zero = tl.zeros((BLOCK_N,), tl.float32)  # sum p z of dynamic V
    q_sum = tl.sum(q, axis=0)
    lane_scale = _lane_scale(BITS, HEAD_DIM)
    limit = tl.minimum(seq_len, tile_hi * BLOCK_N)
    k_raw, k_scale, k_zero, in_seq = _fetch(k_data, k_meta, table_row, tile_lo, limit, kv_head, stride_slot,
                                            stride_meta_slot, BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
    v_raw, v_scale, v_zero, in_seq = _fetch(v_data, v_meta, table_row, tile_lo, limit, kv_head, stride_slot,
                                            stride_meta_slot, BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
    for tile in range(tile_lo, tile_hi):
        next_k, next_k_scale, next_k_zero, next_in_seq = _fetch(
            k_data, k_meta, table_row, tile + 1, limit, kv_head, stride_slot, stride_meta_slot,
            BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
        next_v, next_v_scale, next_v_zero, next_in_seq = _fetch(
            v_data, v_meta, table_row, tile + 1, limit, kv_head, stride_slot, stride_meta_slot,
            BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
        k = _exact(_as_float(k_raw, magic, BITS), lane_scale, BITS)
        s = tl.sum(q[None, :] * k, axis=1)  # [N]
        if DYNAMIC:
            s = s * k_scale + q_sum * k_zero
        s = tl.where(in_seq, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe)
        l = l * alpha + p
        if DYNAMIC:
            acc_zero = acc_zero * alpha + p * v_zero
            p = p * v_scale
        v = _as_float(v_raw, magic, BITS)
        if BITS == 0:
            acc = acc * alpha[:, None] + p[:, None] * v
        else:
            acc = tl.fma(acc, alpha[:, None], tl.fma(p[:, None], v, (p * -8388608.0)[:, None]))
        m = m_new
        k_raw, k_scale, k_zero, v_raw, v_scale, v_zero, in_seq = (
            next_k, next_k_scale, next_k_zero, next_v, next_v_scale, next_v_zero, next_in_seq)
    top = tl.max(m, axis=0)
    weights = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # [N]; 0 for rows that saw no key
    total = tl.sum(weights[:, None] * acc, axis=0) * lane_scale + tl.sum(weights * acc_zero, axis=0)
    return total[None, :], top + tl.zeros((1,), tl.float32), tl.sum(weights * l, axis=0) + tl.zeros((1,), tl.float32)


@triton.jit
def _scale_query(q, k_static_scale, kv_head, STATIC: tl.constexpr, HEAD_DIM: tl.constexpr):
    """q [R, D] float32 times K's static channel scales of kv_head (q . k = (q * s) . c + const)."""
    if STATIC:
        q = q * tl.load(k_static_scale + kv_head * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :]
    return q


@triton.jit
def _apply_static_v(acc, l, v_static_scale, v_static_zero, kv_head, STATIC: tl.constexpr, HEAD_DIM: tl.constexpr):
    """acc = sum p c -> sum p v = s * acc + z * l with V's static channel tables."""
    if STATIC:
        channels = kv_head * HEAD_DIM + tl.arange(0, HEAD_DIM)
        acc = acc * tl.load(v_static_scale + channels)[None, :] + l[:, None] * tl.load(v_static_zero + channels)[None, :]
    return acc


@triton.jit
def _normalized(acc, l):
    """acc / l per row; rows that saw no key (l == 0: a padding row) give zeros."""
    return tl.where(l[:, None] > 0, acc / tl.where(l > 0, l, 1.0)[:, None], 0.0)


# ----------------------------------------------------------------------------------------------
# Decode


@triton.jit
def _decode_kernel(query, k_data, v_data, k_meta, v_meta, k_static_scale, v_static_scale, v_static_zero,
                   tables, seq_lens, out, part_acc, part_stats,
                   scale_log2, magic, stride_qb, stride_qh, stride_table, stride_slot, stride_meta_slot,
                   NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, PARTITIONS: tl.constexpr,
                   BITS: tl.constexpr, DYNAMIC: tl.constexpr, STATIC: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   PDL: tl.constexpr):
    enter_after_producers(PDL)
    kv_head = tl.program_id(0)
    part = tl.program_id(1)
    seq = tl.program_id(2)
    seq_len = tl.load(seq_lens + seq)
    tiles = tl.cdiv(seq_len, BLOCK_N)
    per_part = tl.cdiv(tiles, PARTITIONS)
    tile_lo = part * per_part
    tile_hi = tl.minimum(tile_lo + per_part, tiles)

    g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + g
    head_ok = g < GROUP
    channels = tl.arange(0, HEAD_DIM)
    q = tl.load(query + seq * stride_qb + heads[:, None] * stride_qh + channels[None, :],
                mask=head_ok[:, None], other=0.0)
    q = _scale_query(q.to(tl.float32), k_static_scale, kv_head, STATIC, HEAD_DIM)
    table_row = tables + seq * stride_table
    if BLOCK_G == 1:
        acc, m, l = _attend_one(tl.reshape(q, (HEAD_DIM,)), k_data, v_data, k_meta, v_meta, table_row, seq_len,
                                tile_lo, tile_hi, kv_head, scale_log2, magic, stride_slot, stride_meta_slot,
                                BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE)
    else:
        # The new token sits at seq_len - 1 and sees every cached position.
        q_positions = tl.full((BLOCK_G,), 0, tl.int32) + seq_len - 1
        acc, m, l = _attend_rows(q.to(query.dtype.element_ty), q_positions, k_data, v_data, k_meta, v_meta,
                                 table_row, seq_len, tile_lo, tile_hi, kv_head, scale_log2, magic, stride_slot,
                                 stride_meta_slot, BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE, DOT_PRECISION)
    acc = _apply_static_v(acc, l, v_static_scale, v_static_zero, kv_head, STATIC, HEAD_DIM)
    if PARTITIONS == 1:
        out_rows = out + (seq * NUM_HEADS + heads[:, None]) * HEAD_DIM + channels[None, :]
        tl.store(out_rows, _normalized(acc, l).to(out.dtype.element_ty), mask=head_ok[:, None])
    else:
        # part_acc [B, H, P, D], part_stats [B, H, P, 2] = (m, l)
        partial = (seq * NUM_HEADS + heads) * PARTITIONS + part  # [BLOCK_G]
        tl.store(part_acc + partial[:, None] * HEAD_DIM + channels[None, :], acc, mask=head_ok[:, None])
        tl.store(part_stats + partial * 2, m, mask=head_ok)
        tl.store(part_stats + partial * 2 + 1, l, mask=head_ok)


@triton.jit
def _merge_partitions_kernel(part_acc, part_stats, out, NUM_HEADS: tl.constexpr, PARTITIONS: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PDL: tl.constexpr):
    """out[b, h] = sum_p 2**(m_p - M) acc_p / sum_p 2**(m_p - M) l_p; empty partitions have m = -inf, l = 0."""
    enter_after_producers(PDL)
    head = tl.program_id(0)
    seq = tl.program_id(1)
    parts = (seq * NUM_HEADS + head) * PARTITIONS + tl.arange(0, PARTITIONS)
    m = tl.load(part_stats + parts * 2)
    l = tl.load(part_stats + parts * 2 + 1)
    top = tl.max(m, axis=0)
    weights = tl.exp2(m - tl.where(top == float("-inf"), 0.0, top))  # [P]; 0 for empty partitions
    channels = tl.arange(0, HEAD_DIM)
    acc = tl.sum(weights[:, None] * tl.load(part_acc + parts[:, None] * HEAD_DIM + channels[None, :]), axis=0)
    total = tl.sum(weights * l, axis=0)
    result = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(out + (seq * NUM_HEADS + head) * HEAD_DIM + channels, result.to(out.dtype.element_ty))


@dataclass(frozen=True)
class DecodeLaunch:
    """How paged_decode_attention splits the work; decode_launch picks it from shapes alone."""

    block_n: int  # KV positions per loop iteration
    partitions: int  # programs per (sequence, KV head), each over 1/partitions of the sequence's tiles
    num_warps: int
    num_stages: int  # > 1: software-pipelined loads of tl.dot operands (GQA)


def decode_launch(batch: int, cache: LayerKVCache, group: int, query_dtype: torch.dtype, max_context: int,
                  device: torch.device) -> DecodeLaunch:
    """Tiles and partitions for a decode step, from shapes alone (so fixed for a captured graph).

    group: query heads per KV head; max_context: the block table's width in tokens.
    Partitions: enough that batch x kv_heads x partitions programs fill the GPU, a power
    of two, at most one per tile; none without GQA once the sequences alone fill it.
    Tiles and warps without GQA: runs AD and D (above); with GQA, 64 positions a tl.dot tile.
    """
    keys = cache.keys
    num_kv_heads = keys.data.shape[1]
    sms = sm_count(device)
    unsplit = batch * num_kv_heads >= _UNSPLIT_PROGRAMS_PER_SM * sms
    few = batch * num_kv_heads < sms
    programs_per_sm = _PROGRAMS_PER_SM
    if group == 1 and few:
        block_n, num_warps, programs_per_sm = 32, 2, _FEW_PROGRAMS_PER_SM
    elif group == 1:
        block_n, num_warps = 16, _WARPS_WITHOUT_GQA[keys.bits] if unsplit else 4
    elif query_dtype == torch.float32 or keys.data.dtype == torch.float32:
        block_n, num_warps = 16, 4  # float32 dots on the CUDA cores (the float32 test suite on CUDA)
    else:
        block_n, num_warps = 64, 4
    wanted = 1 if unsplit and group == 1 else triton.cdiv(programs_per_sm * sms, batch * num_kv_heads)
    limit = min(_MAX_PARTITIONS, max(1, triton.cdiv(max_context, block_n)), wanted)
    # tl.dot's operands are loaded through cp.async one tile ahead (Triton's pipeliner);
    # _attend_one prefetches by hand, the pipeliner leaves CUDA-core loops alone.
    return DecodeLaunch(block_n=block_n, partitions=1 << (limit.bit_length() - 1), num_warps=num_warps,
                        num_stages=2 if group > 1 else 1)


def _check(query: torch.Tensor, cache: LayerKVCache) -> None:
    heads, head_dim = query.shape[1], query.shape[2]
    kv_heads = cache.keys.data.shape[1]
    if not supports(head_dim) or heads % kv_heads or cache.keys.head_dim != head_dim:
        raise LmcError(
            f"paged attention kernels got {heads} query heads of {head_dim} over {kv_heads} KV heads of "
            f"{cache.keys.head_dim}; they need a power-of-two head_dim in [16, 256] shared by Q and KV and "
            "query heads a multiple of KV heads (use the reference path, lmcompress.turbo.attention)"
        )


def _slot_stride(cache: LayerKVCache) -> int:
    """Elements per slot of the pools as the kernels read them: floats, or int32 words of codes."""
    data = cache.keys.data
    return data.stride(0) * data.element_size() // (4 if isinstance(cache.keys, QuantKVPool) else data.element_size())


def _kv_args(cache: LayerKVCache) -> tuple[list, dict]:
    """Pool tensors (None where a kind has none) and the constexprs describing them."""
    keys, values = cache.keys, cache.values
    bits, dynamic, static = pool_kind(cache)
    tensors = [
        keys.data, values.data,
        keys.meta if dynamic else None, values.meta if dynamic else None,
        keys.static_scale if static else None, values.static_scale if static else None,
        values.static_zero if static else None,
    ]
    kinds = {"BITS": bits, "DYNAMIC": dynamic, "STATIC": static}
    return tensors, kinds


def _dot_precision(dtype: torch.dtype) -> str:
    """float32 queries multiply in full float32 (as the reference does); 16-bit ones ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, launch: DecodeLaunch | None = None) -> torch.Tensor:
    """One new token per sequence: query [B, H, D] -> [B, H, D].

    block_tables [B, max_blocks] int32; seq_lens [B] int32 count the new token, whose K/V
    is already in the cache; rows with seq_len 0 give zeros.  No host synchronization.
    """
    _check(query, cache)
    batch, num_heads, head_dim = query.shape
    if query.stride(-1) != 1:
        query = query.contiguous()
    num_kv_heads = cache.keys.data.shape[1]
    group = num_heads // num_kv_heads
    kv_tensors, kinds = _kv_args(cache)
    if launch is None:
        launch = decode_launch(batch, cache, group, query.dtype, block_tables.shape[1] * cache.block_size,
                               query.device)
    partitions = launch.partitions
    out = torch.empty(batch, num_heads, head_dim, dtype=query.dtype, device=query.device)
    part_acc = part_stats = None
    if partitions > 1:
        part_acc = torch.empty(batch, num_heads, partitions, head_dim, dtype=torch.float32, device=query.device)
        part_stats = torch.empty(batch, num_heads, partitions, 2, dtype=torch.float32, device=query.device)
    pdl = pdl_launch(query.device)
    _decode_kernel[(num_kv_heads, partitions, batch)](
        query, *kv_tensors, block_tables, seq_lens, out, part_acc, part_stats,
        scale * LOG2E, MAGIC_BITS, query.stride(0), query.stride(1), block_tables.stride(0),
        _slot_stride(cache), num_kv_heads,
        NUM_HEADS=num_heads, GROUP=group, BLOCK_G=1 if group == 1 else max(16, triton.next_power_of_2(group)),
        PARTITIONS=partitions, HEAD_DIM=head_dim, BLOCK_N=launch.block_n, BLOCK_SIZE=cache.block_size,
        DOT_PRECISION=_dot_precision(query.dtype), **kinds, num_warps=launch.num_warps,
        num_stages=launch.num_stages, **pdl,
    )
    if partitions > 1:
        _merge_partitions_kernel[(num_heads, batch)](
            part_acc, part_stats, out, NUM_HEADS=num_heads, PARTITIONS=partitions, HEAD_DIM=head_dim, num_warps=4,
            **pdl,
        )
    return out


# ----------------------------------------------------------------------------------------------
# Prompt chunks


@triton.jit
def _prefill_kernel(query, k_data, v_data, k_meta, v_meta, k_static_scale, v_static_scale, v_static_zero,
                    tables, seq_lens, query_start, out,
                    scale_log2, magic, stride_qt, stride_qh, stride_table, stride_slot, stride_meta_slot,
                    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BITS: tl.constexpr, DYNAMIC: tl.constexpr, STATIC: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    first = tl.load(query_start + seq)
    q_len = tl.load(query_start + seq + 1) - first
    if block * BLOCK_M < q_len:
        seq_len = tl.load(seq_lens + seq)
        cached = seq_len - q_len
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        kv_head = head // GROUP
        channels = tl.arange(0, HEAD_DIM)
        q = tl.load(query + (first + rows)[:, None] * stride_qt + head * stride_qh + channels[None, :],
                    mask=row_ok[:, None], other=0.0)
        q = _scale_query(q.to(tl.float32), k_static_scale, kv_head, STATIC, HEAD_DIM).to(query.dtype.element_ty)
        q_positions = cached + rows
        last_key = cached + tl.minimum(block * BLOCK_M + BLOCK_M, q_len)  # exclusive
        acc, _, l = _attend_rows(q, q_positions, k_data, v_data, k_meta, v_meta, tables + seq * stride_table,
                                 seq_len, 0, tl.cdiv(last_key, BLOCK_N), kv_head, scale_log2, magic, stride_slot,
                                 stride_meta_slot, BITS, DYNAMIC, HEAD_DIM, BLOCK_N, BLOCK_SIZE, DOT_PRECISION)
        acc = _apply_static_v(acc, l, v_static_scale, v_static_zero, kv_head, STATIC, HEAD_DIM)
        out_rows = out + ((first + rows)[:, None] * NUM_HEADS + head) * HEAD_DIM + channels[None, :]
        tl.store(out_rows, _normalized(acc, l).to(out.dtype.element_ty), mask=row_ok[:, None])


def _prefill_blocks(dtype: torch.dtype, bits: int | None, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) that compile for sm_90 without register spills (checked with ptxas)."""
    if dtype == torch.float32:  # float32 dots run on the CUDA cores (CUDA runs of the float32 test suite)
        return 16, 32
    if head_dim > 128 or bits is not None:  # the codes' float tiles add registers
        return 64, 32
    return 64, 64


def paged_prefill_attention(query: torch.Tensor, cache: LayerKVCache, block_tables: torch.Tensor,
                            seq_lens: torch.Tensor, query_start: torch.Tensor, max_query_len: int,
                            scale: float) -> torch.Tensor:
    """New tokens of B sequences packed: query [T, H, D] -> [T, H, D], causal over the paged KV.

    Sequence b's queries are rows query_start[b]:query_start[b + 1], at positions
    seq_lens[b] - q_len + i; their K/V (and all earlier positions') are already cached.
    """
    _check(query, cache)
    num_tokens, num_heads, head_dim = query.shape
    if query.stride(-1) != 1:
        query = query.contiguous()
    num_kv_heads = cache.keys.data.shape[1]
    kv_tensors, kinds = _kv_args(cache)
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    block_m, block_n = _prefill_blocks(query.dtype, cache.keys.bits, head_dim)
    batch = seq_lens.shape[0]
    _prefill_kernel[(triton.cdiv(max_query_len, block_m), num_heads, batch)](
        query, *kv_tensors, block_tables, seq_lens, query_start, out,
        scale * LOG2E, MAGIC_BITS, query.stride(0), query.stride(1), block_tables.stride(0),
        _slot_stride(cache), num_kv_heads,
        NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads, BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_N=block_n, BLOCK_SIZE=cache.block_size, DOT_PRECISION=_dot_precision(query.dtype), **kinds,
        num_warps=4, num_stages=2,
    )
    return out
