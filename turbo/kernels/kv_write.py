"""Fused KV write: quantize the new tokens' K and V and store them in the paged pools, one program per token.

The plain PyTorch oracle is LayerKVCache.write_reference (turbo/kv_cache.py); this
kernel reproduces it bit for bit: the same float32 operations in the same order,
float16 scale/zero rounded the same way, round half to even, and int4 codes packed
as lmcompress/formats/packing.py pack_nibbles does (nibble i of int32 j holds
channel 8j + i).  Rows whose slot is negative (padding rows of a CUDA-graph
batch) are skipped, so the launch never depends on the slots' values.

A program holds one token's [heads, head_dim] tile as [heads, head_dim / 8, 8]:
the last axis is the run of eight channels that int4 packs into one int32, so
packing is a reduction over it and no reshape is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmcompress.turbo.kernels.pdl import enter_after_producers, pdl_launch
from lmcompress.turbo.kv_cache import MIN_SCALE, LayerKVCache, QuantKVPool

_MIN_SCALE = tl.constexpr(MIN_SCALE)


def pool_kind(cache: LayerKVCache) -> tuple[int, bool, bool]:
    """(bits, dynamic, static) of a layer's pools as the kernels take them: bits 0 for a float pool; dynamic:
    per-token scale/zero in the pools' meta; static: calibrated per-channel tables."""
    if not isinstance(cache.keys, QuantKVPool):
        return 0, False, False
    dynamic = cache.keys.meta is not None
    return cache.keys.bits, dynamic, not dynamic


def supports(head_dim: int) -> bool:
    """Head sizes the KV kernels take: powers of two from 16 to 256 (tl.arange and tl.dot need them)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


@triton.jit
def _round_half_even(v):
    """float32 v in [0, 2**22) -> int32 round-half-to-even(v), as torch.round.

    Adding 2**23 leaves no fraction bits, so the float adder rounds (half to even) and
    the integer sits in the low mantissa bits; libdevice's rint would do the same but
    does not run under TRITON_INTERPRET.
    """
    return (v + 8388608.0).to(tl.int32, bitcast=True) - 0x4B000000


@triton.jit
def _write_pool(x_ptr, data_ptr, meta_ptr, scale_ptr, zero_ptr, slot, stride_xh, stride_slot, stride_meta_slot,
                NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                BITS: tl.constexpr, DYNAMIC: tl.constexpr):
    """Store one token's K (or V) x [heads, head_dim] (at x_ptr, head stride stride_xh) into slot `slot`.

    BITS: 0 = float pool (stored as is), 8 or 4 = codes; DYNAMIC: per-token scale/zero into meta.
    """
    head_ids = tl.arange(0, HEADS_P2)
    heads = head_ids[:, None, None]
    runs = tl.arange(0, HEAD_DIM // 8)[None, :, None]
    lanes = tl.arange(0, 8)[None, None, :]
    channels = runs * 8 + lanes  # [1, D/8, 8]
    mask = heads < NUM_HEADS
    x = tl.load(x_ptr + heads * stride_xh + channels, mask=mask, other=0.0)  # [Hp, D/8, 8]
    row = data_ptr + slot * stride_slot
    if BITS == 0:
        tl.store(row + heads * HEAD_DIM + channels, x.to(data_ptr.dtype.element_ty), mask=mask)
    else:
        levels: tl.constexpr = 2.0**BITS - 1.0
        x = x.to(tl.float32)
        if DYNAMIC:
            # As quant_params: zero = min rounded to float16, scale spans [zero, max], both stored as float16.
            zero16 = tl.min(tl.min(x, axis=2), axis=1).to(tl.float16)  # [Hp]
            top = tl.max(tl.max(x, axis=2), axis=1)
            inverse_levels: tl.constexpr = 1.0 / levels
            scale16 = tl.maximum((top - zero16.to(tl.float32)) * inverse_levels, _MIN_SCALE).to(tl.float16)
            meta = meta_ptr + slot * stride_meta_slot + head_ids * 2
            tl.store(meta, scale16, mask=head_ids < NUM_HEADS)
            tl.store(meta + 1, zero16, mask=head_ids < NUM_HEADS)
            scale = scale16.to(tl.float32)[:, None, None]
            zero = zero16.to(tl.float32)[:, None, None]
        else:
            table = heads * HEAD_DIM + channels
            scale = tl.load(scale_ptr + table, mask=mask, other=1.0)
            zero = tl.load(zero_ptr + table, mask=mask, other=0.0)
        # Clamping before rounding equals torch's round-then-clamp: the bounds are integers.
        codes = _round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(x - zero, scale), 0.0), levels))
        if BITS == 8:
            tl.store(row + heads * HEAD_DIM + channels, codes.to(tl.uint8), mask=mask)
        else:
            # The eight nibbles of a run occupy disjoint bits, so their XOR is their OR.
            words = tl.xor_sum(codes << (lanes * 4), axis=2)  # [Hp, D/8] int32
            word_index = head_ids[:, None] * (HEAD_DIM // 8) + tl.arange(0, HEAD_DIM // 8)[None, :]
            tl.store(row + word_index, words, mask=head_ids[:, None] < NUM_HEADS)


@triton.jit
def _write_kv_kernel(slots_ptr, key_ptr, value_ptr, k_data, v_data, k_meta, v_meta,
                     k_scale, k_zero, v_scale, v_zero,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_slot, stride_meta_slot,
                     NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BITS: tl.constexpr, DYNAMIC: tl.constexpr, PDL: tl.constexpr):
    enter_after_producers(PDL)
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:
        _write_pool(key_ptr + token * stride_kt, k_data, k_meta, k_scale, k_zero, slot, stride_kh,
                    stride_slot, stride_meta_slot, NUM_HEADS, HEADS_P2, HEAD_DIM, BITS, DYNAMIC)
        _write_pool(value_ptr + token * stride_vt, v_data, v_meta, v_scale, v_zero, slot, stride_vh,
                    stride_slot, stride_meta_slot, NUM_HEADS, HEADS_P2, HEAD_DIM, BITS, DYNAMIC)


def write_kv(cache: LayerKVCache, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Quantize (int8/int4 pools) and store key, value [T, num_kv_heads, head_dim] into slots [T] (long).

    Rows with slot < 0 are skipped. One launch of T programs; no host synchronization,
    so it can be captured in a CUDA graph.
    """
    num_tokens, num_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    keys, values = cache.keys, cache.values
    key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
    bits, dynamic, static = pool_kind(cache)
    _write_kv_kernel[(num_tokens,)](
        slots, key, value, keys.data, values.data,
        keys.meta if dynamic else None, values.meta if dynamic else None,
        keys.static_scale if static else None, keys.static_zero if static else None,
        values.static_scale if static else None, values.static_zero if static else None,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        keys.data.stride(0), num_heads * 2,
        NUM_HEADS=num_heads, HEADS_P2=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
        BITS=bits, DYNAMIC=dynamic, num_warps=4, **pdl_launch(key.device),
    )
