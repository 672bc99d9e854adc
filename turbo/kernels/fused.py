"""Fused small ops of the decoder layer: RMSNorm (optionally with the residual add), SwiGLU's silu(gate) * up,
and the rotary embedding of queries and keys.

Each kernel reads its inputs once and writes its outputs once, rounding where the torch reference rounds
(the *_reference functions of turbo.models.decoder, which define the semantics and run on any device):
    rms_norm:      h = x + residual in the model dtype; normalise h in float32; cast to the model dtype;
                   multiply by the weight (transformers' order of operations, as turbo's RMSNorm).
    silu_and_mul:  silu(gate) in float32, cast to the model dtype, times up.
    rotary_:       turbo.models.rope.apply_rotary on queries and keys, in place, computed in float32 from the
                   float32 cos and sin and rounded once (the reference rounds cos, sin and each product to the
                   model dtype; they agree within an ulp or two).  One launch replaces apply_rotary's seven
                   small kernels per tensor (0.6 ms of a 7B batch-1 decode step, run H).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmcompress.errors import LmcError
from lmcompress.turbo.kernels.pdl import enter_after_producers, pdl_launch
from lmcompress.turbo.models.decoder import rms_norm_reference, silu_and_mul_reference  # noqa: F401 (the oracles)

SILU_BLOCK = 1024  # output columns per silu_and_mul program


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """rms_norm_reference in one Triton kernel (CUDA); one program normalises one row."""
    hidden = x.shape[-1]
    if weight.shape != (hidden,) or weight.dtype != x.dtype or (residual is not None and residual.shape != x.shape):
        raise LmcError(
            f"rms_norm takes x [..., D], weight [D] of x's dtype and a residual shaped like x, got x "
            f"{list(x.shape)} {x.dtype}, weight {list(weight.shape)} {weight.dtype}"
            + ("" if residual is None else f", residual {list(residual.shape)}")
            + "; cast the weight to the model dtype"
        )
    rows = x.reshape(-1, hidden).contiguous()
    out = torch.empty_like(rows)
    summed = torch.empty_like(rows) if residual is not None else out
    if rows.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, rows if residual is None else residual.reshape(-1, hidden).contiguous(), weight, out, summed,
            hidden, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 512, 1), 16),
            **pdl_launch(x.device),
        )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), summed.view(x.shape)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_and_mul_reference in one Triton kernel (CUDA)."""
    if gate_up.shape[-1] % 2:
        raise LmcError(
            f"silu_and_mul takes gate_up [..., 2I] (gate then up), got {list(gate_up.shape)}; "
            "pass the fused gate_up projection's output"
        )
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width).contiguous()
    out = torch.empty(rows.shape[0], width, device=gate_up.device, dtype=gate_up.dtype)
    if rows.shape[0]:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, SILU_BLOCK))](rows, out, width, BLOCK=SILU_BLOCK,
                                                                              **pdl_launch(gate_up.device))
    return out.view(*gate_up.shape[:-1], width)


def rotary_(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate query [T, H, D] and key [T, Hkv, D] in place by cos, sin [T, D] float32 (strided views such as
    slices of the fused qkv output are fine: their last dim must be contiguous); one program per token."""
    tokens, num_q, head_dim = query.shape
    num_k = key.shape[1]
    if (key.shape[0], key.shape[2]) != (tokens, head_dim) or cos.shape != (tokens, head_dim) or sin.shape != cos.shape \
            or query.stride(-1) != 1 or key.stride(-1) != 1 or head_dim % 2 or key.dtype != query.dtype:
        raise LmcError(
            f"rotary_ takes query [T, H, D], key [T, Hkv, D] of one dtype with contiguous last dims and cos, sin "
            f"[T, D], D even; got {list(query.shape)}, {list(key.shape)}, {list(cos.shape)}, {list(sin.shape)}; "
            "pass the attention's query and key and the rotary table of their positions"
        )
    if tokens:
        cos, sin = cos.contiguous(), sin.contiguous()
        _rotary_kernel[(tokens,)](
            query, key, cos, sin, query.stride(0), query.stride(1), key.stride(0), key.stride(1),
            NUM_Q=num_q, NUM_K=num_k, HALF=head_dim // 2, BLOCK_Q=triton.next_power_of_2(num_q),
            BLOCK_K=triton.next_power_of_2(num_k), BLOCK_HALF=triton.next_power_of_2(head_dim // 2), num_warps=4,
            **pdl_launch(query.device),
        )


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr, BLOCK_Q: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_HALF: tl.constexpr, PDL: tl.constexpr):
    enter_after_producers(PDL)
    token = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    table = token * 2 * HALF + cols  # cos/sin row of this token: [first half | second half]
    cos_first = tl.load(cos_ptr + table, mask=col_ok, other=0.0)[None, :]
    cos_second = tl.load(cos_ptr + table + HALF, mask=col_ok, other=0.0)[None, :]
    sin_first = tl.load(sin_ptr + table, mask=col_ok, other=0.0)[None, :]
    sin_second = tl.load(sin_ptr + table + HALF, mask=col_ok, other=0.0)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, NUM_Q, BLOCK_Q, cols, col_ok, cos_first, cos_second,
                  sin_first, sin_second, HALF)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, NUM_K, BLOCK_K, cols, col_ok, cos_first, cos_second,
                  sin_first, sin_second, HALF)


@triton.jit
def _rotate_heads(base, stride_h, NUM: tl.constexpr, BLOCK_H: tl.constexpr, cols, col_ok, cos_first, cos_second,
                  sin_first, sin_second, HALF: tl.constexpr):
    """Heads [NUM, 2 * HALF] at base: (first, second) -> (first cos - second sin, second cos + first sin)."""
    heads = tl.arange(0, BLOCK_H)
    mask = (heads < NUM)[:, None] & col_ok[None, :]
    first_ptr = base + heads[:, None] * stride_h + cols[None, :]
    first = tl.load(first_ptr, mask=mask, other=0.0)
    second = tl.load(first_ptr + HALF, mask=mask, other=0.0)
    f, s = first.to(tl.float32), second.to(tl.float32)
    tl.store(first_ptr, (f * cos_first - s * sin_first).to(first.dtype), mask=mask)
    tl.store(first_ptr + HALF, (s * cos_second + f * sin_second).to(first.dtype), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    enter_after_producers(PDL)
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    mask = cols < D
    hidden = tl.load(x_ptr + row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row + cols, mask=mask, other=0.0)
        hidden = (hidden.to(tl.float32) + residual.to(tl.float32)).to(hidden.dtype)  # rounded, as x + residual
        tl.store(summed_ptr + row + cols, hidden, mask=mask)
    hidden = hidden.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(hidden * hidden, axis=0) / D + eps)
    normed = (hidden * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, WIDTH, BLOCK: tl.constexpr, PDL: tl.constexpr):
    enter_after_producers(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    gate = tl.load(gate_up_ptr + row * 2 * WIDTH + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * WIDTH + WIDTH + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # rounded to the model dtype, as F.silu's output
    tl.store(out_ptr + row * WIDTH + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=mask)
