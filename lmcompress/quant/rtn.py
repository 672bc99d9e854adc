"""Round-to-nearest group quantization: the quantizer that RTN, AWQ and GPTQ share.

A weight [out, in] is cut into groups of `group_size` consecutive input channels;
each (row, group) gets a float scale and an unsigned zero code, and
w ~= (q - zero) * scale with q in [0, 2**bits).

Asymmetric (cfg.sym False), AutoAWQ's formula:
    scale = (max - min).clamp(min=1e-5) / max_code
    zero  = clamp(-round(min / scale), 0, max_code)
    q     = clamp(round(w / scale) + zero, 0, max_code)
with min <= 0 <= max enforced first (GPTQ does the same).  For a group holding
both signs, i.e. every real weight group of 32+ values, this is exactly AutoAWQ's
result; for a single-signed group AutoAWQ's clamped zero code would clip the whole
group to one value, extending the range to 0 keeps the error within scale / 2.

Symmetric (cfg.sym True), GPTQ's (GPTQModel's Quantizer) convention:
    scale = 2 * max(|min|, |max|) / max_code,  zero = 2**(bits-1)  (8 for 4 bits)
so the codes cover [-8, 7] * scale: the positive extreme is clipped by scale / 2.

Range search (ShrinkSearch, GPTQ's `mse` option): instead of [min, max], each group
takes the range p * [min, max], p over a grid from 1 down, with least
sum |Q(w) - w|^2.4.  GPTQ and AWQ's scale search use it (their `range_search`
option); plain RTN does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.errors import LmcError
from lmcompress.quant.layer import LayerContext
from lmcompress.quant.qtensor import QTensor, QuantConfig

MIN_SCALE_RANGE = 1e-5  # AutoAWQ's floor on (max - min): an all-zero group gets a tiny, finite scale


def check_finite(w: torch.Tensor, name: str) -> None:
    """LmcError naming the weight `name` when w holds NaN or inf."""
    if not torch.isfinite(w).all():
        raise LmcError(
            f"{name} contains NaN or inf values; check the checkpoint (re-download or re-convert it)"
        )


def check_linears(ctx: LayerContext) -> None:
    """Fail before any calibration work if a linear of the layer cannot be quantized."""
    for name in ctx.spec.linears:
        weight = ctx.linear(name).weight
        ctx.cfg.check_divides(f"{ctx.name}.{name}", weight.shape[1])
        check_finite(weight, f"{ctx.name}.{name}")


def group_params(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero code of each group: w [..., group] -> (scale, zero), each [..., 1] float."""
    return _range_params(*group_range(w), cfg)


def group_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of each group of w [..., group], each [..., 1], widened to hold 0."""
    return w.amin(dim=-1, keepdim=True).clamp(max=0), w.amax(dim=-1, keepdim=True).clamp(min=0)


def _range_params(low: torch.Tensor, high: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero code that map [low, high] (low <= 0 <= high) onto the codes."""
    if cfg.sym:
        scale = (2 * torch.maximum(-low, high)).clamp(min=MIN_SCALE_RANGE) / cfg.max_code
        zero = torch.full_like(scale, 2 ** (cfg.bits - 1))
    else:
        scale = (high - low).clamp(min=MIN_SCALE_RANGE) / cfg.max_code
        zero = torch.round(-low / scale).clamp(cfg.min_zero, cfg.max_code)
    return scale, zero


@dataclass(frozen=True)
class ShrinkSearch:
    """GPTQ's `mse` range search (its Quantizer's defaults): try a group's [min, max] shrunk by
    1, 1 - 1/grid, ... (int(max_shrink * grid) steps, so the last is just above 1 - max_shrink)
    and keep the range with least sum |Q(w) - w|^norm."""

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4


def searched_group_params(
    w: torch.Tensor, cfg: QuantConfig, search: ShrinkSearch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Like group_params, with each group's range shrunk as `search` finds best: w [..., group]."""
    low, high = group_range(w)
    best_scale, best_zero = _range_params(low, high, cfg)
    best_error = torch.full_like(best_scale, math.inf)
    for step in range(int(search.max_shrink * search.grid)):
        shrink = 1 - step / search.grid
        scale, zero = _range_params(low * shrink, high * shrink, cfg)
        error = ((quantize_codes(w, scale, zero, cfg) - zero) * scale - w).abs().pow(search.norm).sum(-1, keepdim=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Float codes in [0, max_code] of w, with scale and zero broadcasting against it."""
    return (torch.round(w / scale) + zero).clamp(0, cfg.max_code)


def fake_quantize_groups(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Quantize-dequantize w [..., group] group by group (no checks: for search loops)."""
    scale, zero = group_params(w, cfg)
    return (quantize_codes(w, scale, zero, cfg) - zero) * scale


def quantize_weight(
    w: torch.Tensor, cfg: QuantConfig, name: str = "weight", search: ShrinkSearch | None = None
) -> QTensor:
    """Group-quantize w [out, in]; `name` (the linear's full name) appears in error messages.

    Each group's range is its [min, max], or the shrunk range `search` finds.
    """
    out_features, in_features = w.shape
    cfg.check_divides(name, in_features)
    check_finite(w, name)
    groups = w.detach().float().reshape(out_features, in_features // cfg.group_size, cfg.group_size)
    scale, zero = group_params(groups, cfg) if search is None else searched_group_params(groups, cfg, search)
    codes = quantize_codes(groups, scale, zero, cfg)
    return QTensor(
        q=codes.reshape(out_features, in_features).to(torch.uint8),
        scales=scale.squeeze(-1),
        zeros=zero.squeeze(-1).to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
    )


def fake_quantize(
    w: torch.Tensor, cfg: QuantConfig, name: str = "weight", search: ShrinkSearch | None = None
) -> torch.Tensor:
    """w [out, in] after quantize-dequantize, in w's dtype."""
    return quantize_weight(w, cfg, name, search).dequantize(w.dtype)


@torch.no_grad()
def write_dequantized(linear: nn.Linear, qweight: QTensor) -> None:
    """Make the float layer compute with the quantized weight, so later layers calibrate on it."""
    linear.weight.copy_(qweight.dequantize(linear.weight.dtype))


def rtn_quantize_layer(ctx: LayerContext) -> dict[str, QTensor]:
    """Round every linear of the layer to the nearest code, group ranges [min, max]; no calibration data needed."""
    result = {}
    for name in ctx.spec.linears:
        linear = ctx.linear(name)
        result[name] = quantize_weight(linear.weight, ctx.cfg, f"{ctx.name}.{name}")
        write_dequantized(linear, result[name])
    return result
