"""Perplexity through turbo's paged KV cache: equal to lmcompress.evaluate on the transformers
model with a float32 cache, and the cost of int8/int4 KV (dynamic and static scales) on the
reference model within its targets.  The measured deltas are printed (pytest -s) and recorded
in docs/runtime.md."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmcompress.errors import LmcError
from lmcompress.evaluate import perplexity as hf_perplexity
from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.reference import REFERENCE_CALIB, REFERENCE_HELDOUT, REFERENCE_MODEL_DIR
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import build_model_runner
from lmcompress.turbo.model_runner import ModelRunner
from lmcompress.turbo.perplexity import perplexity

DEVICE = os.environ.get("LMC_TEST_DEVICE", "cpu")
NUM_TOKENS = 2048
WINDOW = 512
# Targets: relative perplexity increase over a float32 cache.
INT8_TARGET = 0.005
INT4_TARGET = 0.03


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def heldout_ids() -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    text = REFERENCE_HELDOUT.read_text()[: 12 * NUM_TOKENS]
    return tokenizer(text, return_tensors="pt")["input_ids"][0][:NUM_TOKENS]


def runner_for(model: Path, **options) -> ModelRunner:
    return build_model_runner(EngineConfig(model=model, device=DEVICE, dtype="float32", block_size=64,
                                           num_kv_blocks=WINDOW // 64, **options))


@pytest.mark.parametrize("stride, chunk_tokens", [(256, 100), (WINDOW, WINDOW)])
def test_float32_kv_equals_transformers_perplexity(heldout_ids, stride, chunk_tokens):
    """Overlapping windows scored through ragged chunks, and disjoint windows in one chunk each."""
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).to(DEVICE)
    expected = hf_perplexity(model, None, heldout_ids, max_length=WINDOW, stride=stride)
    got = perplexity(runner_for(REFERENCE_MODEL_DIR), heldout_ids, WINDOW, stride, chunk_tokens)
    assert got.num_tokens == expected.num_tokens and (got.max_length, got.stride) == (WINDOW, stride)
    assert got.ppl == pytest.approx(expected.ppl, rel=1e-4)


@pytest.fixture(scope="module")
def w4_reference(tmp_path_factory) -> Path:
    """`lmc quantize` of the reference model (RTN, 4-bit): its kv_cache_scales.json gives the static tables."""
    out = tmp_path_factory.mktemp("w4") / "ref-w4"
    options = QuantizeOptions(method="rtn", quant=QuantConfig(group_size=128), calib_data=str(REFERENCE_CALIB),
                              calib_samples=16, calib_seqlen=256, device="cpu")
    quantize_checkpoint(REFERENCE_MODEL_DIR, out, options, progress=False)
    return out


def kv_increase(model: Path, ids: torch.Tensor, baseline: float, **options) -> float:
    return perplexity(runner_for(model, **options), ids, WINDOW, WINDOW).ppl / baseline - 1


@pytest.mark.parametrize("model_name", ["float", "w4-rtn"])
def test_quantized_kv_perplexity_increase_within_targets(model_name, heldout_ids, request):
    model = REFERENCE_MODEL_DIR if model_name == "float" else request.getfixturevalue("w4_reference")
    baseline = perplexity(runner_for(model), heldout_ids, WINDOW, WINDOW).ppl
    settings = {"int8 dynamic": dict(kv_cache_dtype="int8"), "int4 dynamic": dict(kv_cache_dtype="int4")}
    if model_name == "w4-rtn":  # the float checkpoint has no calibrated tables
        settings |= {"int8 static": dict(kv_cache_dtype="int8", kv_quant="static"),
                     "int4 static": dict(kv_cache_dtype="int4", kv_quant="static")}
    increase = {name: kv_increase(model, heldout_ids, baseline, **options) for name, options in settings.items()}
    print(f"\n{model_name}: float32-KV ppl {baseline:.4f}; " +
          ", ".join(f"{name} {100 * delta:+.3f}%" for name, delta in increase.items()))
    for name, delta in increase.items():
        bound = INT8_TARGET if name.startswith("int8") else INT4_TARGET
        assert abs(delta) < bound, f"{name} KV changes perplexity by {100 * delta:+.3f}%"
    # 4 bits lose more than 8: the measurement sees the cache's precision at all.
    assert increase["int4 dynamic"] > increase["int8 dynamic"] + 0.001


def test_window_must_fit_the_model_and_the_pool(heldout_ids):
    runner = runner_for(REFERENCE_MODEL_DIR)
    with pytest.raises(LmcError, match="between 2 and max_model_len 1024"):
        perplexity(runner, heldout_ids, max_length=2048)
    with pytest.raises(LmcError, match="needs 16 KV blocks but the pool has 8"):
        perplexity(runner, heldout_ids, max_length=1024)
    with pytest.raises(LmcError, match="stride 600"):
        perplexity(runner, heldout_ids, max_length=512, stride=600)
