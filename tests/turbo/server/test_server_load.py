"""Load on loopback: 64 concurrent streaming clients, 320 requests, zero errors and every KV block
free afterwards; then `lmc bench serve` against the same server writes the figures it promises."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from click.testing import CliRunner

from lmcompress.cli.main import cli
from lmcompress.reference import REFERENCE_MODEL_DIR

CLIENTS = 64
REQUESTS_PER_CLIENT = 5
MAX_TOKENS = 8
WORDS = "the king said unto Moses and the LORD spake in the beginning of days a land of milk".split()


@pytest.fixture(scope="module")
def server(start_lmc_server):
    with start_lmc_server("--max-num-seqs", "64", "--num-kv-blocks", "256") as server:
        yield server


async def _stream(http: httpx.AsyncClient, rng: random.Random) -> dict:
    """One streamed request (completions or chat, random prompt); returns what the stream carried."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    chat = rng.random() < 0.5
    body = {"max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True},
            "temperature": rng.choice([0.0, 0.8]), "seed": rng.randint(0, 99)}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    async with http.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as response:
        lines = [line async for line in response.aiter_lines() if line]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    return {"status": response.status_code, "done": lines[-1] == "data: [DONE]", "finish": finish,
            "usage": events[-1].get("usage")}


async def _client(url: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        return [await _stream(http, rng) for _ in range(REQUESTS_PER_CLIENT)]


def test_64_concurrent_streaming_clients_all_succeed_and_free_every_block(server):
    before = server.metrics()

    async def load() -> list[dict]:
        per_client = await asyncio.gather(*(_client(server.url, seed) for seed in range(CLIENTS)))
        return [result for results in per_client for result in results]

    results = asyncio.run(load())
    assert len(results) == CLIENTS * REQUESTS_PER_CLIENT
    assert all(r["status"] == 200 and r["done"] for r in results)
    assert all(len(r["finish"]) == 1 and r["finish"][0] in ("stop", "length") for r in results)
    assert all(1 <= r["usage"]["completion_tokens"] <= MAX_TOKENS for r in results)
    after = server.wait_idle()
    assert after["lmc:kv_cache_num_free_blocks"] == after["lmc:kv_cache_num_blocks"] == 256
    assert after["lmc:kv_cache_usage_perc"] == 0
    served = after["lmc:e2e_request_latency_seconds_count"] - before["lmc:e2e_request_latency_seconds_count"]
    assert served == len(results)
    assert after["lmc:generation_tokens_total"] - before["lmc:generation_tokens_total"] == sum(
        r["usage"]["completion_tokens"] for r in results)
    assert "Traceback" not in server.log()


def test_bench_serve_reports_every_figure(server, tmp_path):
    result_file = tmp_path / "bench.json"
    args = ["bench", "serve", "--url", server.url, "--num-prompts", "48", "--random-input-len", "24",
            "--random-output-len", "6", "--ignore-eos", "--tokenizer", str(REFERENCE_MODEL_DIR),
            "--max-concurrency", "16", "--result-file", str(result_file)]
    outcome = CliRunner().invoke(cli, args)
    assert outcome.exit_code == 0, outcome.output
    assert "Output token throughput (tok/s)" in outcome.output and "Mean TTFT (ms)" in outcome.output
    summary = json.loads(result_file.read_text())
    assert summary["completed"] == 48 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 48 * 24
    assert summary["total_output_tokens"] == 48 * 6  # ignore_eos: exactly max_tokens each
    assert summary["config"]["model"] == "ref-llama"  # found through /v1/models
    for figure in ("ttft", "tpot", "itl", "e2el"):
        mean, median, p99 = (summary[f"{stat}_{figure}_ms"] for stat in ("mean", "median", "p99"))
        assert 0 < median <= p99 and mean > 0, figure
    assert summary["mean_ttft_ms"] < summary["mean_e2el_ms"]
    assert summary["output_throughput"] == pytest.approx(48 * 6 / summary["duration_s"])
    assert summary["request_throughput"] == pytest.approx(48 / summary["duration_s"])
    request = summary["requests"][0]
    assert request["tpot"] == pytest.approx((request["latency"] - request["ttft"]) / 5)
    assert len(request["itl"]) == 5  # one gap between each of the six token chunks
    assert server.wait_idle()["lmc:kv_cache_usage_perc"] == 0


def test_bench_serve_with_poisson_arrivals_on_the_chat_endpoint(server, tmp_path):
    result_file = tmp_path / "bench.json"
    args = ["bench", "serve", "--url", server.url, "--model", "ref-llama", "--endpoint", "chat", "--num-prompts",
            "12", "--random-prompt", "words", "--random-input-len", "10", "--random-output-len", "4",
            "--request-rate", "40", "--result-file", str(result_file)]
    outcome = CliRunner().invoke(cli, args)
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(result_file.read_text())
    assert summary["completed"] == 12 and summary["config"]["request_rate"] == "40.0"
    assert 12 <= summary["total_output_tokens"] <= 48


def test_bench_serve_counts_refused_requests_as_failed(server, tmp_path):
    result_file = tmp_path / "bench.json"
    args = ["bench", "serve", "--url", server.url, "--model", "no-such-model", "--num-prompts", "3",
            "--random-prompt", "words", "--result-file", str(result_file)]
    outcome = CliRunner().invoke(cli, args)
    assert outcome.exit_code == 0, outcome.output
    summary = json.loads(result_file.read_text())
    assert summary["completed"] == 0 and summary["failed"] == 3
    assert summary["mean_ttft_ms"] is None
    assert any("HTTP 404" in error for error in summary["errors"])
