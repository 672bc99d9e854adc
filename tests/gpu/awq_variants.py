"""AWQ variants on the reference model, each quantized and scored on the whole held-out text (issue 2's
table): the knobs behind the default that no CLI flag reaches, so the default's choice can be rerun.

    python3 tests/gpu/awq_variants.py OUT.json [--model DIR] [--device cuda] [--samples 128] [--seqlen 512]
        [--calib PATH] [--seeds 42 ...] [--only NAME ...]

Each variant quantizes --model (default tests/assets/ref-llama) with `lmc quantize`'s code
(quantize_checkpoint, --seqlen-token samples of --calib drawn with each seed) and evaluates it as `lmc eval
ppl --max-length 1024 --stride 1024` does (windows of the model's positions where it has fewer); the share of
RTN's gap to fp closed is printed against fp and RTN from the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import tempfile
from functools import partial
from unittest import mock

import torch
from transformers import AutoConfig

from lmcompress import arch
from lmcompress.evaluate import evaluate_checkpoint
from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
from lmcompress.quant import awq, methods, rtn
from lmcompress.quant.layer import SAMPLES_PER_FORWARD, LayerContext

MODEL = "tests/assets/ref-llama"
CALIB = "tests/assets/ref-corpus/calib.txt"
HELDOUT = "tests/assets/ref-corpus/heldout.txt"


def clip_search(**fields) -> contextlib.AbstractContextManager:
    return mock.patch.object(awq, "clip_linear", partial(awq.clip_linear, search=awq.ClipSearch(**fields)))


def clip_tokens(count: int) -> contextlib.AbstractContextManager:
    return mock.patch.object(awq, "CLIP_TOKENS", count)


def clip_on_all_tokens(first_share: float | None = None) -> contextlib.AbstractContextManager:
    """The clip search scored on every calibration token: a group's partial-output MSE is d^T G d, d the
    group's weight error and G [group, group] the mean of x_g^T x_g over the tokens.  first_share: the first
    token of every sample (the attention sink) gets that share of G, the others the rest."""

    def search_clip(weight, x, cfg, search=awq.ClipSearch()):
        out_features, in_features = weight.shape
        groups = in_features // cfg.group_size
        moments = _group_moments(x, groups, cfg.group_size)
        if first_share is not None:
            rest = _group_moments(x[:, 1:], groups, cfg.group_size)
            moments = first_share * _group_moments(x[:, :1], groups, cfg.group_size) + (1 - first_share) * rest
        w = weight.reshape(out_features, groups, cfg.group_size)
        return awq.best_clip(w, partial(_moment_error, w=w, moments=moments), cfg, search)

    return mock.patch.object(awq, "search_clip", search_clip)


def _moment_error(quantized: torch.Tensor, w: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
    """[rows, groups, 1]: d^T G d, d the error of quantized against w [rows, groups, group], G = moments."""
    d = (quantized - w).transpose(0, 1)  # [groups, rows, group]
    return (torch.bmm(d, moments) * d).sum(dim=-1).T.unsqueeze(-1)


def _group_moments(x: torch.Tensor, groups: int, group_size: int) -> torch.Tensor:
    """[groups, group, group]: the mean of x_g^T x_g over the tokens of x [n, seq, in]."""
    moments = torch.zeros(groups, group_size, group_size, device=x.device)
    for chunk in x.split(SAMPLES_PER_FORWARD):
        grouped = chunk.reshape(-1, groups, group_size).transpose(0, 1).float()  # [groups, tokens, group]
        moments.baddbmm_(grouped.transpose(1, 2), grouped)
    return moments / (x.shape[0] * x.shape[1])


def clip_on_diagonal_moments() -> contextlib.AbstractContextManager:
    """The clip search scored on every calibration token with G's diagonal only: sum_i d_i^2 E[x_i^2], the
    activation-weighted weight error, blind to correlations between input channels."""

    def search_clip(weight, x, cfg, search=awq.ClipSearch()):
        out_features, in_features = weight.shape
        groups = in_features // cfg.group_size
        power = sum(chunk.pow(2).sum(dim=(0, 1)) for chunk in x.split(SAMPLES_PER_FORWARD)) / (x.shape[0] * x.shape[1])
        power = power.view(1, groups, cfg.group_size)
        w = weight.reshape(out_features, groups, cfg.group_size)
        return awq.best_clip(w, lambda quantized: ((quantized - w).pow(2) * power).sum(-1, keepdim=True), cfg, search)

    return mock.patch.object(awq, "search_clip", search_clip)


def shrunk_final_ranges() -> contextlib.AbstractContextManager:
    """The final rounding takes each group's range from GPTQ's weight-space shrink search (rtn.ShrinkSearch,
    least sum |Q(w) - w|^2.4), as GPTQ's default does, instead of the (clipped) group's [min, max]."""

    def round_layer(ctx):
        result = {}
        for name in ctx.spec.linears:
            linear = ctx.linear(name)
            result[name] = rtn.quantize_weight(linear.weight, ctx.cfg, name, search=rtn.ShrinkSearch())
            rtn.write_dequantized(linear, result[name])
        return result

    return mock.patch.object(awq, "rtn_quantize_layer", round_layer)


def two_stage_awq(ctx: LayerContext, **options) -> dict:
    """AWQ over the attention groups, their linears rounded, then the MLP groups calibrated on the inputs that
    the quantized attention gives (GPTQ's "true sequential", stage by stage)."""
    result = {}
    for prefix in ("self_attn.", "mlp."):
        spec = dataclasses.replace(
            ctx.spec, linears=tuple(name for name in ctx.spec.linears if name.startswith(prefix)),
            scaling_groups=tuple(group for group in ctx.spec.scaling_groups if group.linears[0].startswith(prefix)))
        result.update(awq.awq_quantize_layer(dataclasses.replace(ctx, spec=spec), **options))
    return result


def two_stage() -> contextlib.AbstractContextManager:
    return mock.patch.dict(methods.METHODS, {"awq": two_stage_awq})


def clip_without_first_token() -> contextlib.AbstractContextManager:
    """The default clip search's 512 evenly spaced tokens, none of them a sample's first (with 128 samples of
    512 tokens the default stride of 128 makes a quarter of its tokens first tokens)."""
    search_clip = awq.search_clip
    return mock.patch.object(awq, "search_clip", lambda weight, x, cfg, search=awq.ClipSearch():
                             search_clip(weight, x[:, 1:], cfg, search))


def scale_loss_first_share(first_share: float) -> contextlib.AbstractContextManager:
    """The scale search's output MSE with the first token of every sample weighted to first_share of it."""

    def output_mse(fn, x, reference):
        first = rest = torch.zeros((), dtype=torch.float64, device=reference.device)
        for x_chunk, ref_chunk in zip(x.split(SAMPLES_PER_FORWARD), reference.split(SAMPLES_PER_FORWARD)):
            error = (fn(x_chunk) - ref_chunk).pow(2)
            first, rest = first + error[:, :1].sum(dtype=torch.float64), rest + error[:, 1:].sum(dtype=torch.float64)
        per_token = reference.numel() // (reference.shape[0] * reference.shape[1])
        tokens = reference.shape[0] * reference.shape[1]
        return (first_share * first / (reference.shape[0] * per_token)
                + (1 - first_share) * rest / ((tokens - reference.shape[0]) * per_token)).item()

    return mock.patch.object(awq, "_output_mse", output_mse)


def first_token_share(share: float) -> contextlib.AbstractContextManager:
    stack = contextlib.ExitStack()
    stack.enter_context(scale_loss_first_share(share))
    stack.enter_context(clip_on_all_tokens(share))
    return stack


def without_group(prev_op: str) -> contextlib.AbstractContextManager:
    llama = arch.ARCHS["llama"]
    groups = tuple(group for group in llama.scaling_groups if group.prev_op != prev_op)
    return mock.patch.dict(arch.ARCHS, {"llama": dataclasses.replace(llama, scaling_groups=groups)})


# name -> (method, method options, context that changes an internal knob)
VARIANTS = {
    "rtn": ("rtn", {}, contextlib.nullcontext),
    "awq": ("awq", {}, contextlib.nullcontext),
    "awq_clip_2048_tokens": ("awq", {}, partial(clip_tokens, 2048)),
    "awq_clip_all_tokens": ("awq", {}, clip_on_all_tokens),
    "awq_clip_no_first_token": ("awq", {}, clip_without_first_token),
    "awq_clip_all_tokens_first_0.25": ("awq", {}, partial(clip_on_all_tokens, 0.25)),
    "awq_scale_first_0.25": ("awq", {}, partial(scale_loss_first_share, 0.25)),
    "awq_first_0.25": ("awq", {}, partial(first_token_share, 0.25)),
    "awq_first_0.5": ("awq", {}, partial(first_token_share, 0.5)),
    "awq_clip_shrink_0.5": ("awq", {}, partial(clip_search, max_shrink=0.5)),
    "awq_clip_autoawq_grid": ("awq", {}, partial(clip_search, grid=20, max_shrink=0.5, absmax=True)),
    "awq_no_up_down_scaling": ("awq", {}, partial(without_group, "mlp.up_proj")),
    "awq_no_clip": ("awq", {"clip": False}, contextlib.nullcontext),
    "awq_clip_diagonal": ("awq", {}, clip_on_diagonal_moments),
    "awq_shrunk_ranges": ("awq", {"clip": False}, shrunk_final_ranges),
    "awq_clip_then_shrunk_ranges": ("awq", {}, shrunk_final_ranges),
    "awq_range_search_shrunk_ranges": ("awq", {"clip": False, "range_search": True}, shrunk_final_ranges),
    "awq_grid_40": ("awq", {"n_grid": 40}, contextlib.nullcontext),
    "awq_two_stage": ("awq", {}, two_stage),
    "gptq": ("gptq", {}, contextlib.nullcontext),
}


def perplexity(model_dir: str, device: str) -> float:
    """Held-out ppl over disjoint windows of 1024 tokens (or the model's positions, where fewer)."""
    window = min(1024, AutoConfig.from_pretrained(model_dir).max_position_embeddings)
    return evaluate_checkpoint(model_dir, HELDOUT, device=device, max_length=window, stride=window).ppl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--calib", default=CALIB)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--only", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    results = {"fp": perplexity(args.model, args.device)}
    runs = [("rtn", 42)] + [(name, seed) for seed in args.seeds for name in args.only if name != "rtn"]
    for name, seed in runs:
        method, options, knob = VARIANTS[name]
        with tempfile.TemporaryDirectory() as tmp, knob():
            opts = QuantizeOptions(method=method, calib_data=args.calib, calib_samples=args.samples,
                                   calib_seqlen=args.seqlen, seed=seed,
                                   device=args.device, method_options=options)
            seconds = quantize_checkpoint(args.model, f"{tmp}/out", opts, progress=False).seconds
            ppl = perplexity(f"{tmp}/out", args.device)
        results["rtn" if name == "rtn" else f"{name}@{seed}"] = ppl
        share = (results["rtn"] - ppl) / (results["rtn"] - results["fp"])
        print(f"{name:24s} seed {seed:3d}  ppl {ppl:.4f}  share of RTN's gap closed {100 * share:5.1f} %  "
              f"quantize {seconds:.1f} s", flush=True)
    with open(args.out, "w") as f:
        json.dump({"model": args.model, "samples": args.samples, "seqlen": args.seqlen, "calib": args.calib,
                   "perplexity": results}, f, indent=1)


if __name__ == "__main__":
    main()
