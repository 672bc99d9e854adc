"""The two-turn prefix benchmark on the reference model: the second turn hits the cache only when caching is on."""

from __future__ import annotations

import dataclasses

import pytest

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.bench_prefix import PrefixBenchConfig, run_prefix_bench
from lmcompress.turbo.config import EngineConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINE = EngineConfig(model=REFERENCE_MODEL_DIR, device="cpu", block_size=16, num_kv_blocks=64)
SETUP = PrefixBenchConfig(prefix_len=300, question_len=8, output_len=4)


def test_second_turn_reuses_the_first_turns_blocks():
    result = run_prefix_bench(ENGINE, SETUP)
    first, second = result["turns"]
    assert first["prompt_len"] == 308 and second["prompt_len"] == 308 + 4 + 8
    # turn 1's 19 full blocks of 16 tokens hit; the warm-up prompt shares nothing
    assert result["prefix_cache"]["hits"] == 19 * 16
    assert result["second_turn_speedup"] == pytest.approx(first["ttft_ms"] / second["ttft_ms"])


def test_without_prefix_caching_nothing_is_reused():
    result = run_prefix_bench(dataclasses.replace(ENGINE, enable_prefix_caching=False), SETUP)
    assert result["prefix_cache"]["hits"] == 0 and result["config"]["prefix_caching"] is False


def test_a_prefix_beyond_the_context_names_the_fix():
    with pytest.raises(LmcError, match="raise --max-model-len or shorten --prefix-len"):
        run_prefix_bench(ENGINE, PrefixBenchConfig(prefix_len=5000))
