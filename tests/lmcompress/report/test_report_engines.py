"""Log-likelihoods through turbo against transformers, batching invariance, and a KV dtype that really counts."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.formats.loader import load_dequantized_model
from lmcompress.report.engines import (
    SCORING_BLOCKS, TurboEngine, continuation_logprob, kv_dtype_named, open_engine, short_kv_name,
)

CPU = torch.device("cpu")


def _pairs(count: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Contexts of 3-150 tokens (some past a 64-token block) and continuations of 1-12, BOS first."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(count):
        context_len = int(torch.randint(3, 150, (1,), generator=generator))
        continuation_len = int(torch.randint(1, 12, (1,), generator=generator))
        ids = torch.randint(10, 8000, (context_len + continuation_len,), generator=generator).tolist()
        pairs.append(([0] + ids[:context_len], ids[context_len:]))
    return pairs


def _transformers_loglikelihoods(model, pairs) -> list[float]:
    """The reference: one plain transformers forward per pair, log-softmax of the continuation's positions."""
    scores = []
    with torch.inference_mode():
        for context, continuation in pairs:
            logits = model(input_ids=torch.tensor([context + continuation])).logits[0].double()
            logprobs = logits.log_softmax(-1)[len(context) - 1 : -1]
            scores.append(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item())
    return scores


@pytest.fixture(scope="module")
def reference_dir():
    from lmcompress import reference

    return reference.REFERENCE_MODEL_DIR


def test_turbo_loglikelihoods_match_transformers_with_a_float32_cache(reference_dir):
    pairs = _pairs(12)
    expected = _transformers_loglikelihoods(load_dequantized_model(reference_dir), pairs)
    engine = open_engine(reference_dir, "fp32", CPU)
    assert engine.name == "turbo"
    assert engine.loglikelihoods(pairs) == pytest.approx(expected, abs=5e-4)


def test_packing_pairs_into_batches_does_not_change_their_scores(reference_dir):
    # More blocks than one scoring pass holds, so the pairs span several forward passes.
    pairs = _pairs(3 * SCORING_BLOCKS // 2, seed=1)
    engine = open_engine(reference_dir, "int8", CPU)
    packed = engine.loglikelihoods(pairs)
    alone = [engine.loglikelihoods([pair])[0] for pair in pairs[:6]]
    assert packed[:6] == pytest.approx(alone, abs=1e-4)


def test_the_kv_dtype_changes_the_scores_a_little(reference_dir):
    pairs = _pairs(8, seed=2)
    fp16 = torch.tensor(open_engine(reference_dir, "fp16", CPU).loglikelihoods(pairs))
    int4 = torch.tensor(open_engine(reference_dir, "int4", CPU).loglikelihoods(pairs))
    gap = (fp16 - int4).abs()
    assert gap.max() > 1e-3  # the int4 cache is really used
    assert gap.mean() < 0.05 * fp16.abs().mean()  # and it is a quantized copy, not garbage


def test_the_scoring_pool_does_not_depend_on_the_perplexity_window(reference_dir):
    """lmc report opens the engine with --max-length, lmc eval task without: both must score alike."""
    short, default = TurboEngine(reference_dir, "int4", CPU, 128), TurboEngine(reference_dir, "int4", CPU, None)
    assert short.max_len == default.max_len
    pairs = _pairs(5, seed=3)
    assert short.loglikelihoods(pairs) == default.loglikelihoods(pairs)


def test_continuation_logprob_reads_the_positions_before_each_continuation_token():
    logits = torch.full((5, 4), -1e9)
    logits[2, 1] = logits[3, 3] = 0.0  # position 2 predicts token 1 surely, position 3 predicts token 3
    assert continuation_logprob(logits, context_len=3, continuation=[1, 3]) == pytest.approx(0.0)
    assert continuation_logprob(logits, context_len=3, continuation=[1, 2]) < -1e8


def test_kv_dtype_names():
    assert [kv_dtype_named(name) for name in ("fp16", "bf16", "fp32", "int8", "int4", "float16")] == [
        "float16", "bfloat16", "float32", "int8", "int4", "float16"]
    assert short_kv_name("bfloat16") == "bf16" and short_kv_name("int4") == "int4"
    with pytest.raises(LmcError, match="'fp8' is not one turbo has; use one of bf16, fp16, fp32, int4, int8"):
        kv_dtype_named("fp8")
