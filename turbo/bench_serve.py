"""The serving benchmark behind `lmc bench serve`: streaming requests against any OpenAI-compatible server.

The figures follow `vllm bench serve` and LMDeploy's profile_restful_api:

    TTFT   send -> first chunk carrying generated text
    ITL    gaps between consecutive text chunks
    TPOT   (latency - TTFT) / (output_tokens - 1), per request
    E2E    send -> end of the stream
    throughput: completed requests and output tokens per second of the whole run

Each figure is reported as mean, median and p99 over the successful requests.
Output tokens come from the final `usage` chunk (stream_options.include_usage),
or, from a server that sends none, the number of text chunks.
Arrivals are all at once (request_rate inf) or a Poisson process at request_rate,
optionally capped at max_concurrency requests in flight.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import string
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from transformers import PreTrainedTokenizerBase

from lmcompress.errors import LmcError

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # token ids only for the completions endpoint
    prompt_len: int  # tokens (words when there is no tokenizer to count with)
    output_len: int  # max_tokens to ask for


@dataclass(frozen=True)
class BenchConfig:
    base_url: str  # e.g. http://127.0.0.1:23333
    model: str
    endpoint: str = "completions"  # a key of ENDPOINTS
    request_rate: float = math.inf  # requests per second; inf = all at once
    max_concurrency: int | None = None
    ignore_eos: bool = False
    api_key: str | None = None
    timeout_s: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise LmcError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise LmcError(f"request rate must be > 0 (inf = all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise LmcError(f"max concurrency must be >= 1, got {self.max_concurrency}; or leave it unset")


@dataclass
class RequestResult:
    prompt_len: int
    ok: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# --- prompts ---------------------------------------------------------------------------------------


def random_requests(num: int, input_len: int, output_len: int, seed: int,
                    tokenizer: PreTrainedTokenizerBase | None = None, as_token_ids: bool = True) -> list[BenchRequest]:
    """`num` prompts of exactly `input_len` random token ids (needs the tokenizer for the vocabulary),
    or of `input_len` random lowercase words (any server; prompt_len then counts words)."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise LmcError("--num-prompts, --random-input-len and --random-output-len must all be >= 1")
    rng = random.Random(seed)
    if as_token_ids:
        if tokenizer is None:
            raise LmcError("random token-id prompts need the model's tokenizer; pass --tokenizer MODEL_DIR "
                           "or --random-prompt words")
        special = set(tokenizer.all_special_ids)
        vocab = [t for t in range(len(tokenizer)) if t not in special]
        return [BenchRequest([rng.choice(vocab) for _ in range(input_len)], input_len, output_len)
                for _ in range(num)]

    def word() -> str:
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))

    return [BenchRequest(" ".join(word() for _ in range(input_len)), input_len, output_len) for _ in range(num)]


def sharegpt_requests(path: str | Path, num: int, seed: int, tokenizer: PreTrainedTokenizerBase | None = None,
                      output_len: int | None = None) -> list[BenchRequest]:
    """`num` conversations drawn (seeded) from a ShareGPT-format JSON file: the first human turn is the
    prompt; the reply's token count (or output_len when given) is max_tokens."""
    if tokenizer is None and output_len is None:
        raise LmcError("ShareGPT prompts need --tokenizer (to size each reply) or a fixed --sharegpt-output-len")
    try:
        conversations = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmcError(f"cannot read ShareGPT file {path} ({exc}); pass a JSON list of "
                       "{'conversations': [{'from': 'human', 'value': ...}, {'from': 'gpt', ...}]}") from exc
    pairs = [_first_exchange(item) for item in conversations if isinstance(item, dict)]
    pairs = [pair for pair in pairs if pair is not None]
    random.Random(seed).shuffle(pairs)
    if len(pairs) < num:
        raise LmcError(f"{path} has {len(pairs)} usable conversations, fewer than --num-prompts {num}; "
                       "ask for fewer prompts")

    def count(text: str) -> int:
        return len(tokenizer(text)["input_ids"]) if tokenizer is not None else len(text.split())

    return [BenchRequest(prompt, count(prompt), output_len or max(count(reply), 1)) for prompt, reply in pairs[:num]]


def _first_exchange(item: dict) -> tuple[str, str] | None:
    turns = item.get("conversations") or []
    if len(turns) < 2 or not all(isinstance(t, dict) for t in turns[:2]):
        return None
    prompt, reply = turns[0].get("value"), turns[1].get("value")
    if not isinstance(prompt, str) or not isinstance(reply, str) or not prompt.strip():
        return None
    return prompt, reply


# --- the run ---------------------------------------------------------------------------------------


async def run_benchmark(requests: Sequence[BenchRequest], config: BenchConfig) -> tuple[list[RequestResult], float]:
    """Send every request (streaming); returns the results in request order and the run's seconds."""
    if config.endpoint == "chat" and not all(isinstance(r.prompt, str) for r in requests):
        raise LmcError("the chat endpoint takes text prompts; use --random-prompt words or a ShareGPT file")
    limit = config.max_concurrency or len(requests)
    gate = asyncio.Semaphore(limit)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    client_limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=config.base_url, headers=headers, limits=client_limits,
                                 timeout=httpx.Timeout(config.timeout_s)) as client:

        async def one(request: BenchRequest) -> RequestResult:
            async with gate:
                return await _stream_one(client, config, request)

        start = time.perf_counter()
        tasks = [asyncio.create_task(one(requests[i])) async for i in _arrivals(len(requests), config)]
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


async def _arrivals(num: int, config: BenchConfig) -> AsyncIterator[int]:
    rng = random.Random(config.seed)
    for i in range(num):
        yield i
        if math.isfinite(config.request_rate):
            await asyncio.sleep(rng.expovariate(config.request_rate))


def _payload(config: BenchConfig, request: BenchRequest) -> dict:
    payload = {"model": config.model, "max_tokens": request.output_len, "temperature": 0.0, "stream": True,
               "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        payload["ignore_eos"] = True  # vLLM's extension; lmc serve and vLLM honour it
    if config.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        payload["prompt"] = request.prompt
    return payload


async def _stream_one(client: httpx.AsyncClient, config: BenchConfig, request: BenchRequest) -> RequestResult:
    result = RequestResult(prompt_len=request.prompt_len)
    text_chunks, last = 0, 0.0
    start = time.perf_counter()
    try:
        async with client.stream("POST", ENDPOINTS[config.endpoint], json=_payload(config, request)) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message", event["error"]))
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                if _chunk_text(event):
                    now = time.perf_counter()
                    if text_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    text_chunks, last = text_chunks + 1, now
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or text_chunks
    result.ok = text_chunks > 0
    if not result.ok:
        result.error = "the stream carried no generated text"
    return result


def _chunk_text(event: dict) -> str:
    choices = event.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


# --- the report ------------------------------------------------------------------------------------


def distribution_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """mean, p50 and p99 in milliseconds; None for each when there are no samples."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if not ms.size:
        return {"mean": None, "p50": None, "p99": None}
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict:
    """The run's figures: counts, throughputs, and mean/median/p99 of TTFT, TPOT, ITL and E2E in ms."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_len for r in done)
    summary = {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
    }
    samples = {
        "ttft": [r.ttft for r in done],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": [gap for r in done for gap in r.itl],
        "e2el": [r.latency for r in done],
    }
    for name, values in samples.items():
        stats = distribution_ms(values)
        for stat, key in (("mean", "mean"), ("median", "p50"), ("p99", "p99")):
            summary[f"{stat}_{name}_ms"] = stats[key]
    summary["errors"] = sorted({r.error for r in results if not r.ok})[:10]
    return summary


def format_table(summary: dict) -> str:
    rows = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total generated tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for name, title in (("ttft", "Time to first token"), ("tpot", "Time per output token (excl. 1st)"),
                        ("itl", "Inter-token latency"), ("e2el", "End-to-end latency")):
        rows.append((f"-- {title} --", ""))
        for stat in ("mean", "median", "p99"):
            value = summary[f"{stat}_{name}_ms"]
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)", "n/a" if value is None else f"{value:.2f}"))
    width = max(len(label) for label, _ in rows) + 4
    lines = ["=" * (width + 12), " Serving benchmark result", "=" * (width + 12)]
    lines += [label if not value else f"{label:<{width}}{value:>12}" for label, value in rows]
    lines += [f"error: {error}" for error in summary["errors"]]
    return "\n".join(lines + ["=" * (width + 12)])


def write_result(path: str | Path, config: BenchConfig, summary: dict, results: Sequence[RequestResult]) -> None:
    settings = {**asdict(config), "request_rate": str(config.request_rate)}  # JSON has no Infinity
    settings.pop("api_key")
    record = {"config": settings, **summary,
              "requests": [{**asdict(r), "tpot": r.tpot} for r in results]}
    Path(path).write_text(json.dumps(record, indent=2, default=str) + "\n")
