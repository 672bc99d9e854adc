"""Activation-aware weight quantization (AWQ), one decoder layer at a time.

The search follows AutoAWQ 0.2.9, with three additions (gqa_scaling and range clipping on by default):
1. Scales.  For each scaling group of the ArchSpec (an op whose output feeds some
   linears) try 20 per-input-channel scales s(r), r = i/20, built from the mean
   |activation| of each channel and (duo scaling) the mean group-normalised |weight|
   of each column; for each, set W <- Q(W * s) / s in the group's linears and measure
   the MSE of the `inspect` submodule's output against the float output; fold the
   best s into the layer (prev_op / s, linear columns * s), which leaves the float
   function unchanged.
   + gqa_scaling: under grouped-query attention v_proj has fewer outputs than o_proj
     has inputs, and AutoAWQ skips v_proj -> o_proj.  Here each value channel gets one
     scale, shared by the o_proj columns of every query head that reads it.
   + range_search (off by default): Q in the trial W <- Q(W * s) / s takes each group's
     range from GPTQ's MSE shrink search (rtn.ShrinkSearch) instead of plain [min, max].
     On the reference model it made no difference (18.3205 against 18.3158 held-out ppl,
     docs/quantization.md) at 5x the search time (7 -> 34 s on the H200; a 7B layer 14 s).
2. Clipping, for every linear: per (output row, group) shrink the group's range over a
   100-step grid down to 0.2 of it and keep the range with least MSE of that group's
   partial output on <= 512 tokens.
   + range clipping: the clamp range is shrink * [min, max], which narrows both ends
     of an asymmetric group; AutoAWQ clamps to +-shrink * max|w| over 1, 0.95, ...,
     0.55, which narrows the shorter side only once the longer one is cut down to its
     length, and skips q_proj / k_proj.
3. Round to nearest (rtn.py) and write the dequantized weights back.

Differences from AutoAWQ beyond those options:
- Everything runs in float32 on the layer's device (AutoAWQ searches in the model's
  fp16, on the CPU when no GPU is present).
- The clip tokens are evenly spaced, at most 512 (AutoAWQ's stride can leave up to 1023).
- Groups are searched and folded one at a time in execution order.  The inputs are
  captured once from the float layer: folding a group's scale divides its own
  linears' inputs by s (applied to the captured copy, exactly as AutoAWQ does) and,
  in exact arithmetic, leaves every other linear's input unchanged, because the
  layer's float function is unchanged.  So no recapture is needed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
from torch import nn

from lmcompress.arch import ArchSpec, ScalingGroup
from lmcompress.errors import LmcError
from lmcompress.quant.layer import SAMPLES_PER_FORWARD, LayerContext
from lmcompress.quant.qtensor import QTensor, QuantConfig
from lmcompress.quant.rtn import (
    ShrinkSearch,
    check_linears,
    fake_quantize,
    fake_quantize_groups,
    group_range,
    rtn_quantize_layer,
)

logger = logging.getLogger(__name__)

# [out, in] float weight -> the same weight after quantize-dequantize
WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]

CLIP_TOKENS = 512
# Bounds each [groups, tokens, output-channel batch] tensor of the clip search (128 MiB in float32).
CLIP_CHUNK_ELEMENTS = 2**25


def awq_quantize_layer(
    ctx: LayerContext,
    duo_scaling: bool = True,
    clip: bool = True,
    gqa_scaling: bool = True,
    range_search: bool = False,
    n_grid: int = 20,
) -> dict[str, QTensor]:
    """AWQ-quantize every linear of ctx.layer; folds the scales into the layer and writes back Q(W).

    duo_scaling: scales from activations and weights (else activations only); clip: run
    the clip search; gqa_scaling: scale v_proj -> o_proj under grouped-query attention
    too; range_search: the scale search's trial quantizer takes group ranges from the
    MSE shrink search (else [min, max]); n_grid: scale grid points.
    """
    check_linears(ctx)
    if n_grid < 1:
        raise LmcError(f"AWQ n_grid {n_grid} is out of range; use a positive grid size (default 20)")
    sources = input_sources(ctx.spec)
    inputs = ctx.capture_inputs(sorted(set(sources.values())))
    quantizer = partial(fake_quantize, cfg=ctx.cfg, search=ShrinkSearch() if range_search else None)
    apply_scales(ctx, inputs, quantizer, duo_scaling=duo_scaling, n_grid=n_grid, gqa_scaling=gqa_scaling)
    if clip:
        for name in ctx.spec.linears:
            clip_linear(ctx.linear(name), inputs[sources[name]], ctx.cfg)
    return rtn_quantize_layer(ctx)


def input_sources(spec: ArchSpec) -> dict[str, str]:
    """Each linear -> the linear whose input it reads too (the first of its scaling group, else itself)."""
    sources = {name: name for name in spec.linears}
    for group in spec.scaling_groups:
        for name in group.linears:
            sources[name] = group.linears[0]
    return sources


@torch.no_grad()
def apply_scales(
    ctx: LayerContext,
    inputs: dict[str, torch.Tensor],
    quantizer: WeightQuantizer,
    duo_scaling: bool = True,
    n_grid: int = 20,
    gqa_scaling: bool = True,
) -> dict[str, torch.Tensor]:
    """Search and fold the scale of every foldable group, in execution order.

    `inputs` maps the first linear of each group to its captured input [n, seq, in]; the
    input of each scaled group is divided by its s in place.  Returns {prev_op: s [prev_op outputs]}.
    """
    applied = {}
    for group in ctx.spec.scaling_groups:
        channels = channel_map(ctx, group, gqa_scaling)
        if channels is None:
            logger.debug("%s: AWQ skips %s -> %s (shapes differ)", ctx.name, group.prev_op, group.linears)
            continue
        x = inputs[group.linears[0]]
        scales = search_scale(ctx, group, x, quantizer, duo_scaling=duo_scaling, n_grid=n_grid, channels=channels)
        fold_scale(ctx, group, scales, channels)
        x.div_(scales[channels])
        applied[group.prev_op] = scales
    return applied


def channel_map(ctx: LayerContext, group: ScalingGroup, gqa_scaling: bool = True) -> torch.Tensor | None:
    """[in] the prev_op output channel that feeds each input channel of the group's linears,
    or None when 1/s cannot be folded into prev_op.

    Usually prev_op's outputs are the linears' inputs, one to one.  Under grouped-query
    attention v_proj has fewer outputs than o_proj has inputs: each KV head's value
    channel d feeds channel d of every query head that shares that KV head (HF's
    repeat_kv: query head h reads KV head h // n_rep).  With gqa_scaling the scale of
    such a value channel multiplies all o_proj columns it feeds; otherwise (AutoAWQ)
    the group is skipped.
    """
    in_features = ctx.linear(group.linears[0]).in_features
    prev = ctx.module(group.prev_op)
    device = prev.weight.device
    if not isinstance(prev, nn.Linear):
        return torch.arange(in_features, device=device) if tuple(prev.weight.shape) == (in_features,) else None
    if prev.out_features == in_features:
        return torch.arange(in_features, device=device)
    if not (gqa_scaling and group.prev_op == ctx.spec.v_proj):
        return None
    attention = ctx.module(group.prev_op.rsplit(".", 1)[0])
    n_rep, head_dim = attention.num_key_value_groups, attention.head_dim
    if prev.out_features * n_rep != in_features:
        return None
    column = torch.arange(in_features, device=device)
    query_head, dim = column // head_dim, column % head_dim
    return query_head // n_rep * head_dim + dim


@torch.no_grad()
def search_scale(
    ctx: LayerContext,
    group: ScalingGroup,
    x: torch.Tensor,
    quantizer: WeightQuantizer,
    duo_scaling: bool = True,
    n_grid: int = 20,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-channel scale s [prev_op outputs] of the grid with least output MSE of group.inspect on x [n, seq, in].

    channels [in] (channel_map; default one to one) ties the linears' input channels
    fed by one prev_op output: their statistics are averaged and they share its scale.
    """
    linears = [ctx.linear(name) for name in group.linears]
    originals = [linear.weight.detach().clone() for linear in linears]
    if channels is None:
        channels = torch.arange(x.shape[-1], device=x.device)
    x_mean = _tied_mean(_mean_abs_per_channel(x), channels)
    w_mean = _tied_mean(_normalised_weight_mean(originals, ctx.cfg.group_size), channels) if duo_scaling else None
    inspect = partial(ctx.call_submodule, group.inspect)
    reference = ctx.batched(inspect, x)
    best_loss, best_ratio, best_scales = math.inf, None, None
    try:
        for step in range(n_grid):
            ratio = step / n_grid
            scales = candidate_scales(x_mean, w_mean, ratio)
            expanded = scales[channels]
            for linear, weight in zip(linears, originals):
                linear.weight.copy_(quantizer(weight * expanded) / expanded)
            loss = _output_mse(inspect, x, reference)
            if loss < best_loss:
                best_loss, best_ratio, best_scales = loss, ratio, scales
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.copy_(weight)
    if best_scales is None:
        raise LmcError(
            f"AWQ scale search for {ctx.name}.{group.inspect} produced only non-finite errors; "
            "check the checkpoint and the calibration data for NaN/inf values"
        )
    logger.debug(
        "%s: AWQ %s -> %s best ratio %.2f (mse %.3g)", ctx.name, group.prev_op, group.inspect, best_ratio, best_loss
    )
    return best_scales


def _tied_mean(values: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """values [in] averaged over the input channels that channels [in] maps to one prev_op output."""
    size = int(channels.max()) + 1
    total = torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, channels, values)
    return total / torch.bincount(channels, minlength=size).to(values.dtype)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float) -> torch.Tensor:
    """s = x_mean^r / w_mean^(1-r) (or x_mean^r without duo scaling), normalised so that max(s) * min(s) = 1."""
    scales = x_mean.pow(ratio)
    if w_mean is not None:
        scales = scales / (w_mean.pow(1 - ratio) + 1e-4)
    scales = scales.clamp(min=1e-4)
    return scales / (scales.max() * scales.min()).sqrt()


def _mean_abs_per_channel(x: torch.Tensor) -> torch.Tensor:
    """[in] mean |x| over all tokens of x [n, seq, in], without materialising |x| whole."""
    total = sum(chunk.abs().sum(dim=(0, 1)) for chunk in x.split(SAMPLES_PER_FORWARD))
    return total / (x.shape[0] * x.shape[1])


def _normalised_weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """[in] mean over all rows of the group's linears of |w| / max |w| of its quantization group."""
    w = torch.cat(weights).abs()
    grouped = w.view(w.shape[0], -1, group_size)
    return (grouped / (grouped.amax(dim=-1, keepdim=True) + 1e-6)).view_as(w).mean(dim=0)


def _output_mse(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared difference of fn(x) from reference, chunk by chunk (float64 accumulation)."""
    total = torch.zeros((), dtype=torch.float64, device=reference.device)
    for x_chunk, ref_chunk in zip(x.split(SAMPLES_PER_FORWARD), reference.split(SAMPLES_PER_FORWARD)):
        total += (fn(x_chunk) - ref_chunk).pow(2).sum(dtype=torch.float64)
    return total.item() / reference.numel()


@torch.no_grad()
def fold_scale(ctx: LayerContext, group: ScalingGroup, scales: torch.Tensor, channels: torch.Tensor | None = None) -> None:
    """prev_op's output channels / s, the group's linears' input columns * s[channels]: the float
    function is unchanged.  channels [in]: channel_map (default one to one)."""
    prev = ctx.module(group.prev_op)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(scales.view(-1, 1))
    else:
        prev.weight.div_(scales)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(scales)
    expanded = scales if channels is None else scales[channels]
    for name in group.linears:
        ctx.linear(name).weight.mul_(expanded)


@dataclass(frozen=True)
class ClipSearch:
    """The clip grid: clamp ranges shrunk by 1, 1 - 1/grid, ... down to 1 - max_shrink (end included).

    Default: clamp a group to shrink * [min, max], which narrows both ends of an
    asymmetric group.  absmax (AutoAWQ's clip): clamp it to +-shrink * max|w|.
    """

    grid: int = 100
    max_shrink: float = 0.8
    absmax: bool = False

    def shrinks(self) -> list[float]:
        return [1 - step / self.grid for step in range(int(self.max_shrink * self.grid) + 1)]

    def ranges(self, w: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Clamp range (low, high), each [..., 1], of w [..., group] at one shrink."""
        if self.absmax:
            bound = w.abs().amax(dim=-1, keepdim=True) * shrink
            return -bound, bound
        low, high = group_range(w)
        return low * shrink, high * shrink


@torch.no_grad()
def clip_linear(
    linear: nn.Linear, x: torch.Tensor, cfg: QuantConfig, search: ClipSearch = ClipSearch()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp each (row, group) of linear.weight to its searched range; returns (low, high), each [out, groups, 1]."""
    low, high = search_clip(linear.weight, x, cfg, search)
    grouped = linear.weight.view(low.shape[0], low.shape[1], -1)
    grouped.copy_(torch.clamp(grouped, low, high))
    return low, high


@torch.no_grad()
def search_clip(
    weight: torch.Tensor, x: torch.Tensor, cfg: QuantConfig, search: ClipSearch = ClipSearch()
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (row, group) of weight [out, in], the clamp range with least MSE of the group's partial output.

    x [n, seq, in] are the linear's inputs; at most CLIP_TOKENS evenly spaced tokens are used.
    Returns (low, high), each [out, groups, 1].
    """
    out_features, in_features = weight.shape
    n_groups = in_features // cfg.group_size
    tokens = x.reshape(-1, in_features)
    tokens = tokens[:: math.ceil(tokens.shape[0] / CLIP_TOKENS)]
    # [groups, tokens, group]: one batched matmul gives every group's partial output
    x_groups = tokens.reshape(-1, n_groups, cfg.group_size).transpose(0, 1)
    rows_per_batch = max(1, CLIP_CHUNK_ELEMENTS // (n_groups * tokens.shape[0]))
    w_groups = weight.reshape(out_features, n_groups, cfg.group_size)
    lows, highs = [], []
    for batch in w_groups.split(rows_per_batch):
        error = partial(_partial_output_error, x_groups=x_groups, reference=_group_outputs(batch, x_groups))
        low, high = best_clip(batch, error, cfg, search)
        lows.append(low)
        highs.append(high)
    return torch.cat(lows), torch.cat(highs)


def best_clip(
    w: torch.Tensor, error: Callable[[torch.Tensor], torch.Tensor], cfg: QuantConfig, search: ClipSearch
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, groups, group] -> the (low, high), each [rows, groups, 1], of search's grid whose clamped and
    quantized w has the least error(quantized) [rows, groups, 1]."""
    best_low, best_high = search.ranges(w, 1.0)
    best_error = torch.full_like(best_low, math.inf)
    for shrink in search.shrinks():
        low, high = search.ranges(w, shrink)
        error_at = error(fake_quantize_groups(torch.clamp(w, low, high), cfg))
        better = error_at < best_error
        best_error = torch.where(better, error_at, best_error)
        best_low = torch.where(better, low, best_low)
        best_high = torch.where(better, high, best_high)
    return best_low, best_high


def _partial_output_error(quantized: torch.Tensor, x_groups: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """[rows, groups, 1]: the mean over the tokens of the squared difference of each group's partial output
    under quantized [rows, groups, group] from reference [groups, tokens, rows]."""
    return (_group_outputs(quantized, x_groups) - reference).pow(2).mean(dim=1).T.unsqueeze(-1)


def _group_outputs(w: torch.Tensor, x_groups: torch.Tensor) -> torch.Tensor:
    """Per-group partial outputs [groups, tokens, rows] of w [rows, groups, group],
    x_groups [groups, tokens, group]."""
    return torch.bmm(x_groups, w.permute(1, 2, 0))
