"""The runtime that scores one cell: turbo with a chosen KV cache dtype, or transformers for bitsandbytes.

Both engines answer the same two questions, so `lmc eval ppl --kv-cache-dtype`,
`lmc eval task` and `lmc report` compute every number through one code path:

    perplexity(ids, max_length, stride)  sliding-window perplexity of token ids [N]
    loglikelihoods(pairs)                summed log p(continuation | context) of each
                                         (context ids, continuation ids) pair

The perplexity math itself lives in lmcompress.turbo.perplexity (turbo) and
lmcompress.evaluate (transformers); this module only picks and feeds them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from lmcompress.errors import LmcError
from lmcompress.evaluate import DEFAULT_MAX_LENGTH, PerplexityResult
from lmcompress.report import bnb
from lmcompress.report.tasks import Task, TaskResult, score_task
from lmcompress.turbo.config import DTYPE_ALIASES
from lmcompress.turbo.kv_cache import KV_CACHE_DTYPES

Pair = tuple[list[int], list[int]]  # (context token ids, continuation token ids)

# KV blocks and packed tokens of one log-likelihood forward pass (the latter bounds its
# [tokens, vocab] float32 logits).  Fixed, not derived from the perplexity window, so a
# task scores through the same batches in `lmc report` and in `lmc eval task`.
SCORING_BLOCKS = 32
SCORING_TOKENS = 4096
# Sequences per transformers forward pass when scoring.
TRANSFORMERS_BATCH = 16
_SHORT_KV_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def kv_dtype_named(text: str) -> str:
    """The runtime's name for a KV cache dtype given as fp16/bf16/fp32/int8/int4 or float16/...; else LmcError."""
    name = DTYPE_ALIASES.get(text, text)
    if name not in KV_CACHE_DTYPES:
        short = sorted({_SHORT_KV_NAMES.get(n, n) for n in KV_CACHE_DTYPES})
        raise LmcError(f"KV cache dtype {text!r} is not one turbo has; use one of {', '.join(short)}")
    return name


def short_kv_name(name: str) -> str:
    return _SHORT_KV_NAMES.get(name, name)


class Engine(Protocol):
    name: str  # "turbo" or "transformers"
    max_len: int  # longest context + continuation one request may have

    def perplexity(self, ids: torch.Tensor, max_length: int | None, stride: int | None) -> PerplexityResult: ...

    def loglikelihoods(self, pairs: Sequence[Pair]) -> list[float]: ...


def open_engine(model_dir: str | Path, kv_cache_dtype: str, device: torch.device,
                max_length: int | None = None) -> Engine:
    """turbo for float/AWQ/GPTQ checkpoints, transformers for bitsandbytes ones (float16 KV only)."""
    kv_cache_dtype = kv_dtype_named(kv_cache_dtype)
    if bnb.is_bnb_checkpoint(model_dir):
        if kv_cache_dtype != bnb.COMPUTE_DTYPE_NAME:
            raise LmcError(
                f"{model_dir} holds bitsandbytes weights, which turbo does not run, and transformers keeps their "
                f"KV cache in {bnb.COMPUTE_DTYPE_NAME}; pass --kv-cache-dtype fp16"
            )
        return TransformersEngine(model_dir, device)
    return TurboEngine(model_dir, kv_cache_dtype, device, max_length)


def continuation_logprob(logits: torch.Tensor, context_len: int, continuation: Sequence[int]) -> float:
    """logits [>= context_len + len(continuation) - 1, vocab] of one pair's positions -> sum log p(continuation).

    The logits at position p predict token p + 1, so the continuation's tokens are
    predicted by positions context_len - 1 .. context_len + len(continuation) - 2.
    """
    rows = logits[context_len - 1 : context_len - 1 + len(continuation)].float()
    targets = torch.tensor(continuation, device=rows.device)
    return torch.log_softmax(rows, dim=-1).gather(-1, targets[:, None]).sum().item()


class TurboEngine:
    name = "turbo"

    def __init__(self, model_dir: str | Path, kv_cache_dtype: str, device: torch.device, max_length: int | None):
        from lmcompress.checkpoint import Checkpoint
        from lmcompress.turbo.config import EngineConfig
        from lmcompress.turbo.engine import build_model_runner

        positions = int(Checkpoint(model_dir).config.get("max_position_embeddings") or DEFAULT_MAX_LENGTH)
        window = max_length or min(positions, DEFAULT_MAX_LENGTH)
        block_size = EngineConfig.block_size  # turbo's default KV block length
        blocks = max(-(-window // block_size), SCORING_BLOCKS)
        # Eager: scoring is all prefill, so decode-step CUDA graphs would only cost capture time and memory.
        self.runner = build_model_runner(EngineConfig(
            model=str(model_dir), device=str(device), kv_cache_dtype=kv_cache_dtype, num_kv_blocks=blocks,
            enforce_eager=True,
        ))
        self.max_len = min(self.runner.max_model_len, SCORING_BLOCKS * self.runner.block_size)

    def perplexity(self, ids: torch.Tensor, max_length: int | None, stride: int | None) -> PerplexityResult:
        from lmcompress.turbo.perplexity import perplexity

        return perplexity(self.runner, ids, max_length, stride)

    def loglikelihoods(self, pairs: Sequence[Pair]) -> list[float]:
        """Each pair is one sequence of a packed prefill with logits at every position; its tokens
        attend to K/V read back from the (possibly quantized) cache, as a served prompt does."""
        from lmcompress.turbo.forward_batch import SeqInput

        scores = []
        for batch in self._batches(pairs):
            seqs, next_block = [], 0
            for context, continuation in batch:
                blocks = self._blocks(context, continuation)
                seqs.append(SeqInput(context + continuation, 0, list(range(next_block, next_block + blocks)), "all"))
                next_block += blocks
            forward_batch = self.runner.build_batch(seqs)
            logits = self.runner.forward(forward_batch).split(list(forward_batch.logit_counts))
            scores.extend(continuation_logprob(rows, len(context), continuation)
                          for rows, (context, continuation) in zip(logits, batch))
        return scores

    def _blocks(self, context: list[int], continuation: list[int]) -> int:
        return -(-(len(context) + len(continuation)) // self.runner.block_size)

    def _batches(self, pairs: Sequence[Pair]) -> Iterator[list[Pair]]:
        """Consecutive pairs packed while they fit SCORING_BLOCKS blocks and SCORING_TOKENS tokens."""
        batch, blocks, tokens = [], 0, 0
        for pair in pairs:
            pair_blocks, pair_tokens = self._blocks(*pair), len(pair[0]) + len(pair[1])
            if batch and (blocks + pair_blocks > SCORING_BLOCKS or tokens + pair_tokens > SCORING_TOKENS):
                yield batch
                batch, blocks, tokens = [], 0, 0
            batch.append(pair)
            blocks += pair_blocks
            tokens += pair_tokens
        if batch:
            yield batch


class TransformersEngine:
    name = "transformers"

    def __init__(self, model_dir: str | Path, device: torch.device):
        self.model = bnb.load_bnb_model(model_dir, device)
        self.device = device
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH)

    def perplexity(self, ids: torch.Tensor, max_length: int | None, stride: int | None) -> PerplexityResult:
        from lmcompress.evaluate import perplexity

        return perplexity(self.model, None, ids, max_length=max_length, stride=stride, device=self.device)

    @torch.inference_mode()
    def loglikelihoods(self, pairs: Sequence[Pair]) -> list[float]:
        """Pairs right-padded into batches; padding sits after every scored position, so causal attention ignores it."""
        scores = []
        for start in range(0, len(pairs), TRANSFORMERS_BATCH):
            batch = pairs[start : start + TRANSFORMERS_BATCH]
            length = max(len(context) + len(continuation) for context, continuation in batch)
            inputs = torch.zeros(len(batch), length, dtype=torch.long)
            for row, (context, continuation) in enumerate(batch):
                inputs[row, : len(context) + len(continuation)] = torch.tensor(context + continuation)
            logits = self.model(input_ids=inputs.to(self.device), use_cache=False).logits  # [B, T, V]
            scores.extend(continuation_logprob(logits[row], len(context), continuation)
                          for row, (context, continuation) in enumerate(batch))
        return scores


def eval_token_ids(model_dir: str | Path, text: str, max_tokens: int | None) -> torch.Tensor:
    """The evaluation text's token ids [N] by the model's tokenizer (default special tokens), cut to max_tokens."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt", verbose=False)["input_ids"][0]
    return ids[:max_tokens] if max_tokens is not None else ids


def measure_perplexity(engine: Engine, model_dir: str | Path, text: str, max_tokens: int | None,
                       max_length: int | None, stride: int | None) -> PerplexityResult:
    """`lmc eval ppl --kv-cache-dtype`: the engine's sliding-window perplexity of the text."""
    return engine.perplexity(eval_token_ids(model_dir, text, max_tokens), max_length, stride)


def measure_task(engine: Engine, model_dir: str | Path, task: Task, limit: int | None) -> TaskResult:
    """`lmc eval task`: the engine's accuracy on the task's first `limit` items."""
    from transformers import AutoTokenizer

    return score_task(task, AutoTokenizer.from_pretrained(model_dir), engine.loglikelihoods, engine.max_len, limit)
