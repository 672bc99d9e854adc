"""bench_serve without a server: prompt sets of the promised lengths, ShareGPT parsing, and the
figures computed from known per-request timings."""

from __future__ import annotations

import json
import math

import pytest

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.bench_serve import (
    BenchConfig, RequestResult, format_table, random_requests, sharegpt_requests, summarize,
)
from lmcompress.turbo.engine import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(REFERENCE_MODEL_DIR)


def test_random_token_id_prompts_have_exact_lengths_and_no_special_tokens(tokenizer):
    requests = random_requests(20, 33, 7, seed=1, tokenizer=tokenizer)
    special = set(tokenizer.all_special_ids)
    assert all(len(r.prompt) == r.prompt_len == 33 and r.output_len == 7 for r in requests)
    assert not special & {t for r in requests for t in r.prompt}
    assert requests == random_requests(20, 33, 7, seed=1, tokenizer=tokenizer)  # seeded
    assert requests != random_requests(20, 33, 7, seed=2, tokenizer=tokenizer)


def test_random_word_prompts_need_no_tokenizer():
    requests = random_requests(5, 12, 3, seed=0, as_token_ids=False)
    assert all(len(r.prompt.split()) == r.prompt_len == 12 for r in requests)
    with pytest.raises(LmcError, match="--tokenizer"):
        random_requests(5, 12, 3, seed=0)


def test_sharegpt_takes_the_first_exchange_and_sizes_replies(tmp_path, tokenizer):
    data = [
        {"conversations": [{"from": "human", "value": "What is a king?"}, {"from": "gpt", "value": "A ruler of men."}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "empty prompt"}]},
        {"id": "no conversations"},
        {"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"},
                           {"from": "human", "value": "later turns are ignored"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    requests = sharegpt_requests(path, 2, seed=0, tokenizer=tokenizer)
    assert sorted(r.prompt for r in requests) == ["Say hi", "What is a king?"]
    for r in requests:
        assert r.prompt_len == len(tokenizer(r.prompt)["input_ids"])
    king = next(r for r in requests if r.prompt.startswith("What"))
    assert king.output_len == len(tokenizer("A ruler of men.")["input_ids"])
    assert {r.output_len for r in sharegpt_requests(path, 2, seed=0, output_len=9)} == {9}
    with pytest.raises(LmcError, match="fewer than --num-prompts 3"):
        sharegpt_requests(path, 3, seed=0, tokenizer=tokenizer)
    path.write_text("{not json")
    with pytest.raises(LmcError, match="cannot read ShareGPT"):
        sharegpt_requests(path, 1, seed=0, output_len=4)


def test_summary_figures_from_known_timings():
    results = [
        RequestResult(prompt_len=10, ok=True, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4),
        RequestResult(prompt_len=20, ok=True, output_tokens=3, ttft=0.3, latency=0.7, itl=[0.2, 0.2]),
        RequestResult(prompt_len=30, ok=True, output_tokens=1, ttft=0.2, latency=0.2),
        RequestResult(prompt_len=40, error="HTTP 429: queue full"),
    ]
    summary = summarize(results, duration_s=2.0)
    assert (summary["completed"], summary["failed"]) == (3, 1)
    assert summary["total_input_tokens"] == 60 and summary["total_output_tokens"] == 9
    assert summary["request_throughput"] == 1.5 and summary["output_throughput"] == 4.5
    assert summary["total_token_throughput"] == 34.5
    assert summary["mean_ttft_ms"] == pytest.approx(200) and summary["median_ttft_ms"] == pytest.approx(200)
    # TPOT = (latency - TTFT) / (tokens - 1): 100 ms and 200 ms; a one-token request has none.
    assert summary["mean_tpot_ms"] == pytest.approx(150) and summary["median_tpot_ms"] == pytest.approx(150)
    assert summary["mean_itl_ms"] == pytest.approx(800 / 6)
    assert summary["p99_e2el_ms"] == pytest.approx(700 - 0.02 * 200)  # linear interpolation between 500 and 700
    assert summary["errors"] == ["HTTP 429: queue full"]
    table = format_table(summary)
    assert "Successful requests" in table and "Median TPOT (ms)" in table and "HTTP 429" in table


def test_bench_config_rejects_nonsense():
    with pytest.raises(LmcError, match="request rate"):
        BenchConfig(base_url="http://127.0.0.1:1", model="m", request_rate=0)
    with pytest.raises(LmcError, match="endpoint"):
        BenchConfig(base_url="http://127.0.0.1:1", model="m", endpoint="embeddings")
    assert math.isinf(BenchConfig(base_url="http://127.0.0.1:1", model="m").request_rate)
