"""Activation-aware weight quantization (AWQ), one decoder layer at a time.

The search follows AutoAWQ 0.2.9:
1. Scales.  For each scaling group of the ArchSpec (an op whose output feeds some
   linears) try 20 per-input-channel scales s(r), r = i/20, built from the mean
   |activation| of each channel and (duo scaling) the mean group-normalised |weight|
   of each column; for each, set W <- Q(W * s) / s in the group's linears and measure
   the MSE of the `inspect` submodule's output against the float output; fold the
   best s into the layer (prev_op / s, linear columns * s), which leaves the float
   function unchanged.
2. Clipping (not for q_proj / k_proj, whose errors the q.k product amplifies): per
   (output row, group) shrink the clamp range +-max|w| over 1, 0.95, ..., 0.5 and keep
   the bound with least MSE of that group's partial output on <= 512 tokens.
3. Round to nearest (rtn.py) and write the dequantized weights back.

Differences from AutoAWQ, on purpose:
- Everything runs in float32 on the layer's device (AutoAWQ searches in the model's
  fp16, on the CPU when no GPU is present).
- The clip grid includes the 0.5 end point (AutoAWQ stops at 0.55), and the clip
  tokens are evenly spaced, at most 512 (AutoAWQ's stride can leave up to 1023).
- Groups are searched and folded one at a time in execution order.  The inputs are
  captured once from the float layer: folding a group's scale divides its own
  linears' inputs by s (applied to the captured copy, exactly as AutoAWQ does) and,
  in exact arithmetic, leaves every other linear's input unchanged, because the
  layer's float function is unchanged.  So no recapture is needed.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Callable

import torch
from torch import nn

from lmcompress.arch import ArchSpec, ScalingGroup
from lmcompress.errors import LmcError
from lmcompress.quant.layer import SAMPLES_PER_FORWARD, LayerContext
from lmcompress.quant.qtensor import QTensor, QuantConfig
from lmcompress.quant.rtn import check_linears, fake_quantize, fake_quantize_groups, rtn_quantize_layer

logger = logging.getLogger(__name__)

# [out, in] float weight -> the same weight after quantize-dequantize
WeightQuantizer = Callable[[torch.Tensor], torch.Tensor]

UNCLIPPED_PROJECTIONS = ("q_proj", "k_proj")
CLIP_TOKENS = 512
CLIP_MAX_SHRINK = 0.5
# Bounds each [groups, tokens, output-channel batch] tensor of the clip search (128 MiB in float32).
CLIP_CHUNK_ELEMENTS = 2**25


def awq_quantize_layer(
    ctx: LayerContext, duo_scaling: bool = True, clip: bool = True, n_grid: int = 20
) -> dict[str, QTensor]:
    """AWQ-quantize every linear of ctx.layer; folds the scales into the layer and writes back Q(W)."""
    check_linears(ctx)
    if n_grid < 1:
        raise LmcError(f"AWQ n_grid {n_grid} is out of range; use a positive grid size (default 20)")
    sources = input_sources(ctx.spec)
    inputs = ctx.capture_inputs(sorted(set(sources.values())))
    quantizer = partial(fake_quantize, cfg=ctx.cfg)
    apply_scales(ctx, inputs, quantizer, duo_scaling=duo_scaling, n_grid=n_grid)
    if clip:
        for name in ctx.spec.linears:
            if name.rsplit(".", 1)[-1] not in UNCLIPPED_PROJECTIONS:
                clip_linear(ctx.linear(name), inputs[sources[name]], ctx.cfg, n_grid)
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
) -> dict[str, torch.Tensor]:
    """Search and fold the scale of every foldable group, in execution order.

    `inputs` maps the first linear of each group to its captured input [n, seq, in]; the
    input of each scaled group is divided by its s in place.  Returns {prev_op: s [in]}.
    """
    applied = {}
    for group in ctx.spec.scaling_groups:
        if not is_foldable(ctx, group):
            logger.debug("%s: AWQ skips %s -> %s (shapes differ)", ctx.name, group.prev_op, group.linears)
            continue
        x = inputs[group.linears[0]]
        scales = search_scale(ctx, group, x, quantizer, duo_scaling=duo_scaling, n_grid=n_grid)
        fold_scale(ctx, group, scales)
        x.div_(scales)
        applied[group.prev_op] = scales
    return applied


def is_foldable(ctx: LayerContext, group: ScalingGroup) -> bool:
    """Whether 1/s can be folded into prev_op's output channels, one per input of the linears.

    Fails for v_proj -> o_proj under grouped-query attention, where v_proj has fewer
    output channels than o_proj has inputs.
    """
    in_features = ctx.linear(group.linears[0]).in_features
    prev = ctx.module(group.prev_op)
    if isinstance(prev, nn.Linear):
        return prev.out_features == in_features
    return tuple(prev.weight.shape) == (in_features,)


@torch.no_grad()
def search_scale(
    ctx: LayerContext,
    group: ScalingGroup,
    x: torch.Tensor,
    quantizer: WeightQuantizer,
    duo_scaling: bool = True,
    n_grid: int = 20,
) -> torch.Tensor:
    """The per-input-channel scale s [in] of the grid with least output MSE of group.inspect on x [n, seq, in]."""
    linears = [ctx.linear(name) for name in group.linears]
    originals = [linear.weight.detach().clone() for linear in linears]
    x_mean = _mean_abs_per_channel(x)
    w_mean = _normalised_weight_mean(originals, ctx.cfg.group_size) if duo_scaling else None
    inspect = partial(ctx.call_submodule, group.inspect)
    reference = ctx.batched(inspect, x)
    best_loss, best_ratio, best_scales = math.inf, None, None
    try:
        for step in range(n_grid):
            ratio = step / n_grid
            scales = candidate_scales(x_mean, w_mean, ratio)
            for linear, weight in zip(linears, originals):
                linear.weight.copy_(quantizer(weight * scales) / scales)
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
def fold_scale(ctx: LayerContext, group: ScalingGroup, scales: torch.Tensor) -> None:
    """prev_op's output channels / s, the group's linears' input columns * s: the float function is unchanged."""
    prev = ctx.module(group.prev_op)
    if isinstance(prev, nn.Linear):
        prev.weight.div_(scales.view(-1, 1))
    else:
        prev.weight.div_(scales)
    if getattr(prev, "bias", None) is not None:
        prev.bias.div_(scales)
    for name in group.linears:
        ctx.linear(name).weight.mul_(scales)


@torch.no_grad()
def clip_linear(linear: nn.Linear, x: torch.Tensor, cfg: QuantConfig, n_grid: int = 20) -> torch.Tensor:
    """Clamp each (row, group) of linear.weight to the searched bound; returns the bounds [out, groups, 1]."""
    bounds = search_clip(linear.weight, x, cfg, n_grid)
    grouped = linear.weight.view(bounds.shape[0], bounds.shape[1], -1)
    grouped.copy_(torch.clamp(grouped, -bounds, bounds))
    return bounds


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, cfg: QuantConfig, n_grid: int = 20) -> torch.Tensor:
    """Per (row, group) of weight [out, in], the clamp bound with least MSE of the group's partial output.

    x [n, seq, in] are the linear's inputs; at most CLIP_TOKENS evenly spaced tokens are used.
    """
    out_features, in_features = weight.shape
    n_groups = in_features // cfg.group_size
    tokens = x.reshape(-1, in_features)
    tokens = tokens[:: math.ceil(tokens.shape[0] / CLIP_TOKENS)]
    # [groups, tokens, group]: one batched matmul gives every group's partial output
    x_groups = tokens.reshape(-1, n_groups, cfg.group_size).transpose(0, 1)
    rows_per_batch = max(1, CLIP_CHUNK_ELEMENTS // (n_groups * tokens.shape[0]))
    w_groups = weight.reshape(out_features, n_groups, cfg.group_size)
    return torch.cat([_best_clip(batch, x_groups, cfg, n_grid) for batch in w_groups.split(rows_per_batch)])


def _best_clip(w: torch.Tensor, x_groups: torch.Tensor, cfg: QuantConfig, n_grid: int) -> torch.Tensor:
    """w [rows, groups, group], x_groups [groups, tokens, group] -> best bound [rows, groups, 1]."""
    reference = _group_outputs(w, x_groups)
    absmax = w.abs().amax(dim=-1, keepdim=True)
    best_bound = absmax.clone()
    best_error = torch.full_like(absmax, math.inf)
    for step in range(int(CLIP_MAX_SHRINK * n_grid) + 1):
        bound = absmax * (1 - step / n_grid)
        quantized = fake_quantize_groups(torch.clamp(w, -bound, bound), cfg)
        # [groups, tokens, rows] -> mean over tokens -> [rows, groups, 1]
        error = (_group_outputs(quantized, x_groups) - reference).pow(2).mean(dim=1).T.unsqueeze(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_bound = torch.where(better, bound, best_bound)
    return best_bound


def _group_outputs(w: torch.Tensor, x_groups: torch.Tensor) -> torch.Tensor:
    """Per-group partial outputs [groups, tokens, rows] of w [rows, groups, group],
    x_groups [groups, tokens, group]."""
    return torch.bmm(x_groups, w.permute(1, 2, 0))
