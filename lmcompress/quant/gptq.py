"""GPTQ: quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's
inputs (Frantar et al. 2022, as AutoGPTQ / GPTQModel implement it).

Per linear: H = 2 X X^T / n over all calibration tokens (a running mean);
channels that never fire (H[i, i] == 0) get H[i, i] = 1 and a zero weight column;
H += damp * mean(diag H) * I, with damp raised x10 whenever the Cholesky
factorization fails; U = upper Cholesky factor of H^-1.  Columns are processed in
blocks of 128: column i is rounded, err = (w_i - q_i) / U[i, i] updates the rest of
its block at once (W[:, i:] -= err * U[i, i:]), and the block's errors update the
later columns in one matmul.  Group scale and zero are computed when a column opens
a new group, from the current (error-updated) weights of that group.  (AutoGPTQ and
GPTQModel read them from W, which lacks the updates made earlier in the same block
when group_size < 128; we read the updated block.)  With range_search (the default)
a group's range is the one GPTQ's `mse` shrink search finds (rtn.ShrinkSearch), not
its [min, max]: AutoGPTQ / GPTQModel leave that search off by default.

Act-order processes the columns by descending H[i, i] (most active channels first);
groups then follow the processing order, and the QTensor's g_idx maps each input
channel (original order) to its group, as the GPTQ v1 format stores it.  With
static groups the group parameters are computed up front from the original weight
in the original channel order, so g_idx stays the identity grouping.

"True sequential": the layer's linears are quantized set by set
(ArchSpec.sequential_groups, e.g. q/k/v, then o, then gate/up, then down), and the
Hessians of each set come from a forward pass through the layer whose earlier sets
are already quantized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from lmcompress.errors import LmcError
from lmcompress.quant.layer import LayerContext
from lmcompress.quant.qtensor import QTensor, QuantConfig
from lmcompress.quant.rtn import (
    ShrinkSearch,
    check_finite,
    check_linears,
    group_params,
    quantize_codes,
    searched_group_params,
    write_dequantized,
)

logger = logging.getLogger(__name__)

# (weights [..., group], cfg) -> (scale, zero), each [..., 1]: group_params or searched_group_params
GroupParams = Callable[[torch.Tensor, QuantConfig], tuple[torch.Tensor, torch.Tensor]]

BLOCK_SIZE = 128  # a multiple of every supported group size, so no group straddles two blocks
DEFAULT_DAMP_PERCENT = 0.01
MAX_DAMP_PERCENT = 1.0  # damping as large as H's mean diagonal; more would drown H and degrade GPTQ to RTN


def gptq_quantize_layer(
    ctx: LayerContext,
    damp_percent: float = DEFAULT_DAMP_PERCENT,
    act_order: bool = False,
    static_groups: bool = False,
    range_search: bool = True,
) -> dict[str, QTensor]:
    """GPTQ-quantize every linear of ctx.layer, set by set, writing back the dequantized weights.

    range_search: group ranges from the MSE shrink search (else [min, max]).
    """
    check_linears(ctx)
    if not 0 <= damp_percent <= MAX_DAMP_PERCENT:
        raise LmcError(f"damp_percent {damp_percent} is out of range; use a value in [0, 1] (default 0.01)")
    result = {}
    # Without declared sets every linear calibrates on the float layer, in one set.
    for names in ctx.spec.sequential_groups or (ctx.spec.linears,):
        hessians = accumulate_hessians(ctx, names)
        for name in names:
            linear = ctx.linear(name)
            result[name] = gptq_quantize_weight(
                linear.weight,
                hessians.pop(name),
                ctx.cfg,
                f"{ctx.name}.{name}",
                damp_percent=damp_percent,
                act_order=act_order,
                static_groups=static_groups,
                range_search=range_search,
            )
            write_dequantized(linear, result[name])
    return result


@dataclass
class RunningHessian:
    """H = 2/n * sum of x x^T over the n token rows added so far."""

    h: torch.Tensor  # [in, in] float32
    n: int = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        total = self.n + rows.shape[0]
        self.h.mul_(self.n / total).addmm_(rows.T, rows, alpha=2 / total)
        self.n = total


def accumulate_hessians(ctx: LayerContext, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """H [in, in] of each named linear's inputs, from one forward of the layer as it is now."""
    sizes = {name: ctx.linear(name).in_features for name in names}
    running = {name: RunningHessian(torch.zeros(size, size, device=ctx.inputs.device)) for name, size in sizes.items()}
    ctx.feed_inputs(list(names), lambda name, x: running[name].add(x))
    return {name: acc.h for name, acc in running.items()}


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    cfg: QuantConfig,
    name: str,
    damp_percent: float = DEFAULT_DAMP_PERCENT,
    act_order: bool = False,
    static_groups: bool = False,
    range_search: bool = True,
) -> QTensor:
    """Quantize weight [out, in] given the Hessian [in, in] of its inputs; `name` is for messages.

    range_search: each group's range from the MSE shrink search (else its [min, max]).
    """
    out_features, in_features = weight.shape
    cfg.check_divides(name, in_features)
    check_finite(weight, name)
    if not torch.isfinite(hessian).all():
        raise LmcError(
            f"the calibration activations entering {name} contain NaN or inf; "
            "check the checkpoint and the calibration data"
        )
    w = weight.detach().float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    w[:, dead] = 0
    n_groups = in_features // cfg.group_size
    params = partial(searched_group_params, search=ShrinkSearch()) if range_search else group_params
    static = params(w.view(out_features, n_groups, cfg.group_size), cfg) if static_groups else None

    order = torch.arange(in_features, device=w.device)
    if act_order:
        order = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, order], h[order][:, order]
    upper = hessian_inverse_upper(h, damp_percent, name)
    codes, scales, zeros = _quantize_columns(w, upper, cfg, static, order, params)

    g_idx = None
    if act_order:
        inverse = torch.argsort(order)
        codes = codes[:, inverse]
        if not static_groups:
            g_idx = (torch.arange(in_features, device=w.device) // cfg.group_size)[inverse].to(torch.int32)
    return QTensor(
        q=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.uint8),
        bits=cfg.bits,
        group_size=cfg.group_size,
        g_idx=g_idx,
    )


def _quantize_columns(
    w: torch.Tensor,
    upper: torch.Tensor,
    cfg: QuantConfig,
    static: tuple[torch.Tensor, torch.Tensor] | None,
    order: torch.Tensor,
    params: GroupParams = group_params,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The GPTQ sweep over w [out, in] (columns in processing order; updated in place).

    Returns float codes [out, in] in processing order and scales, zeros [out, groups]:
    per processing-order group, or the static ones (original-order groups) when given.
    """
    out_features, in_features = w.shape
    group_size = cfg.group_size
    codes = torch.empty_like(w)
    if static is None:
        scales = torch.empty(out_features, in_features // group_size, device=w.device)
        zeros = torch.empty_like(scales)
    else:
        scales, zeros = static[0].squeeze(-1), static[1].squeeze(-1)
        static_group_of = (order // group_size).tolist()  # original group of each processed column
    for start in range(0, in_features, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, in_features)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        block_upper = upper[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if static is not None:
                group = static_group_of[column]
                scale, zero = scales[:, group : group + 1], zeros[:, group : group + 1]
            elif column % group_size == 0:
                scale, zero = params(block[:, i : i + group_size], cfg)
                scales[:, column // group_size] = scale[:, 0]
                zeros[:, column // group_size] = zero[:, 0]
            q = quantize_codes(block[:, i : i + 1], scale, zero, cfg)
            codes[:, column : column + 1] = q
            error = (block[:, i : i + 1] - (q - zero) * scale) / block_upper[i, i]
            block[:, i:] -= error * block_upper[i : i + 1, i:]
            errors[:, i : i + 1] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes, scales, zeros


def hessian_inverse_upper(h: torch.Tensor, damp_percent: float, name: str) -> torch.Tensor:
    """U with U^T U = (H + damp * mean(diag H) * I)^-1, U upper triangular.

    When a Cholesky factorization fails (H singular or badly conditioned: too few or
    too similar calibration tokens) damp is raised x10 up to MAX_DAMP_PERCENT, with a
    warning, instead of aborting the whole run.
    """
    mean_diagonal = h.diagonal().mean()
    for damp in _damp_ladder(damp_percent):
        upper = _damped_inverse_upper(h, damp * mean_diagonal)
        if upper is not None:
            if damp != damp_percent:
                logger.warning(
                    "GPTQ: Cholesky of the Hessian of %s failed with damp_percent %g; raised it to %g",
                    name, damp_percent, damp,
                )
            return upper
    raise LmcError(
        f"GPTQ cannot invert the Hessian of {name} even with damp_percent {MAX_DAMP_PERCENT}; "
        "calibrate with more (and more varied) samples, or use --method awq or rtn"
    )


def _damp_ladder(start: float):
    """start, 10 * start, 100 * start, ... below MAX_DAMP_PERCENT, then MAX_DAMP_PERCENT."""
    damp = start
    while damp < MAX_DAMP_PERCENT:
        yield damp
        damp = damp * 10 if damp > 0 else DEFAULT_DAMP_PERCENT
    yield MAX_DAMP_PERCENT


def _damped_inverse_upper(h: torch.Tensor, damp: torch.Tensor) -> torch.Tensor | None:
    damped = h.clone()
    damped.diagonal().add_(damp)
    lower, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    return upper if info.item() == 0 else None
