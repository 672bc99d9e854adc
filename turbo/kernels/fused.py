"""Fused small ops of the decoder layer: RMSNorm (optionally with the residual add) and SwiGLU's silu(gate) * up.

Each kernel reads its inputs once and writes its outputs once, rounding where the torch reference rounds
(the *_reference functions, which define the semantics and run on any device):
    rms_norm:      h = x + residual in the model dtype; normalise h in float32; cast to the model dtype;
                   multiply by the weight (transformers' order of operations, as turbo's RMSNorm).
    silu_and_mul:  silu(gate) in float32, cast to the model dtype, times up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lmcompress.errors import LmcError

SILU_BLOCK = 1024  # output columns per silu_and_mul program


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., D], weight [D] -> normed [..., D]; with residual: (normed(x + residual), x + residual)."""
    if residual is not None:
        hidden = x + residual
        return rms_norm_reference(hidden, weight, eps), hidden
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate then up) -> silu(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


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
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(width, SILU_BLOCK))](rows, out, width, BLOCK=SILU_BLOCK)
    return out.view(*gate_up.shape[:-1], width)


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
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
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, WIDTH, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    gate = tl.load(gate_up_ptr + row * 2 * WIDTH + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * WIDTH + WIDTH + cols, mask=mask, other=0.0)
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)  # rounded to the model dtype, as F.silu's output
    tl.store(out_ptr + row * WIDTH + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=mask)
