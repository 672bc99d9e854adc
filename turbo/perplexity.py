"""Sliding-window perplexity through turbo's model runner, so the KV cache dtype really counts.

The windows are lmcompress.evaluate's (same scored tokens, same definition).  Each
window is fed as prefill chunks into the paged KV cache: a chunk writes its K/V
to the window's blocks and attends to the earlier chunks' K/V read back from the
cache, so with an int8/int4 cache every scored token sees quantized context, as a
served request does.

    python -m lmcompress.turbo.perplexity MODEL_DIR --data tests/assets/ref-corpus/heldout.txt \
        --kv-cache-dtype int4 --kv-quant static --max-length 512 --stride 512 --max-tokens 16384
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

import torch
import torch.nn.functional as F

from lmcompress.errors import LmcError
from lmcompress.evaluate import DEFAULT_MAX_LENGTH, PerplexityResult, Window, sliding_windows
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.forward_batch import SeqInput
from lmcompress.turbo.model_runner import ModelRunner

# Tokens per prefill chunk when the caller gives none: several chunks per default window.
DEFAULT_CHUNK_TOKENS = 256


def perplexity(runner: ModelRunner, ids: torch.Tensor, max_length: int | None = None, stride: int | None = None,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> PerplexityResult:
    """Perplexity of the token ids [N] with windows of max_length every stride tokens.

    The runner must serve nothing else meanwhile: windows overwrite the first
    ceil(max_length / block_size) blocks of its KV pool.
    max_length: default min(max_model_len, 2048); stride: default max_length // 2.
    """
    ids = ids.reshape(-1).long().cpu()
    if ids.numel() < 2:
        raise LmcError(
            f"the evaluation text has {ids.numel()} token(s) and perplexity needs at least 2; pass a longer text"
        )
    max_length = max_length or min(runner.max_model_len, DEFAULT_MAX_LENGTH)
    stride = stride or max_length // 2
    _check_window(runner, max_length, stride, chunk_tokens)
    block_table = list(range(-(-max_length // runner.block_size)))
    windows = sliding_windows(ids.numel(), max_length, stride)
    total_nll = sum(_window_nll(runner, ids, window, block_table, chunk_tokens) for window in windows)
    num_tokens = sum(window.end - window.first_scored for window in windows)
    nll_mean = total_nll / num_tokens
    ppl = torch.tensor(nll_mean, dtype=torch.float64).exp().item()
    return PerplexityResult(ppl=ppl, nll_mean=nll_mean, num_tokens=num_tokens, max_length=max_length, stride=stride)


def _window_nll(runner: ModelRunner, ids: torch.Tensor, window: Window, block_table: list[int],
                chunk_tokens: int) -> float:
    """Summed NLL of the window's scored tokens; position p of the window predicts its token p + 1."""
    tokens = ids[window.begin : window.end]
    # Window positions whose logits score a token: those predicting first_scored .. end - 1.
    first_row, end_row = window.first_scored - 1 - window.begin, len(tokens) - 1
    total = 0.0
    for start in range(0, len(tokens), chunk_tokens):
        end = min(start + chunk_tokens, len(tokens))
        lo, hi = max(start, first_row), min(end, end_row)
        mode = "all" if lo < hi else "none"
        batch = runner.build_batch([SeqInput(tokens[start:end].tolist(), start, block_table, mode)])
        logits = runner.forward(batch)  # [end - start, vocab] float32, or [0, vocab]
        if mode == "all":
            total += F.cross_entropy(logits[lo - start : hi - start], tokens[lo + 1 : hi + 1].to(logits.device),
                                     reduction="sum").item()
    return total


def _check_window(runner: ModelRunner, max_length: int, stride: int, chunk_tokens: int) -> None:
    if not 2 <= max_length <= runner.max_model_len:
        raise LmcError(
            f"perplexity window of {max_length} tokens must be between 2 and max_model_len {runner.max_model_len}; "
            "pass a --max-length in that range"
        )
    if not 1 <= stride <= max_length:
        raise LmcError(
            f"perplexity stride {stride} must be between 1 and the window length {max_length}; pass a smaller --stride"
        )
    if chunk_tokens < 1:
        raise LmcError(f"prefill chunks of {chunk_tokens} tokens are empty; pass --chunk-tokens 1 or more")
    needed = -(-max_length // runner.block_size)
    if needed > runner.num_blocks:
        raise LmcError(
            f"a {max_length}-token window needs {needed} KV blocks but the pool has {runner.num_blocks}; "
            "give the KV cache more blocks or pass a shorter --max-length"
        )


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from lmcompress.calib.data import load_eval_text
    from lmcompress.turbo.engine import build_model_runner

    parser = argparse.ArgumentParser(description="Perplexity through turbo's paged (optionally quantized) KV cache.")
    parser.add_argument("model", help="model directory")
    parser.add_argument("--data", required=True, help="evaluation text: a local file or a named set (wikitext2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-cache-dtype", default="auto")
    parser.add_argument("--kv-quant", default="dynamic", choices=["dynamic", "static"])
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--stride", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    args = parser.parse_args(argv)
    # The pool holds one window: perplexity() reuses its blocks for every window.
    window = args.max_length or DEFAULT_MAX_LENGTH
    runner = build_model_runner(EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype,
        kv_quant=args.kv_quant, block_size=args.block_size, num_kv_blocks=-(-window // args.block_size),
    ))
    ids = AutoTokenizer.from_pretrained(args.model)(load_eval_text(args.data), return_tensors="pt")["input_ids"][0]
    result = perplexity(runner, ids[: args.max_tokens], args.max_length, args.stride, args.chunk_tokens)
    print(json.dumps({"model": args.model, "kv_cache_dtype": runner.kv_spec.dtype, "kv_quant": args.kv_quant,
                      **asdict(result)}))


if __name__ == "__main__":
    main()
