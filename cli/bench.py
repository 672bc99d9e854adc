"""`lmc bench`: benchmarks.  `lmc bench serve` drives a running OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import math

import click
import httpx

from lmcompress.errors import LmcError


@click.group("bench")
def bench_group() -> None:
    """Measure serving performance."""


@bench_group.command("serve")
@click.option("--url", "base_url", default="http://127.0.0.1:23333", show_default=True,
              help="Base URL of the server (without /v1).")
@click.option("--model", default=None, help="Model name to request; default: the first of GET /v1/models.")
@click.option("--endpoint", type=click.Choice(["completions", "chat"]), default="completions", show_default=True)
@click.option("--num-prompts", type=int, default=100, show_default=True)
@click.option("--dataset-path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A ShareGPT-format JSON file; without it prompts are random.")
@click.option("--random-input-len", type=int, default=128, show_default=True)
@click.option("--random-output-len", type=int, default=128, show_default=True)
@click.option("--random-prompt", type=click.Choice(["ids", "words"]), default=None,
              help="Random prompts as token ids (exact lengths; needs --tokenizer) or words (any server). "
                   "[default: ids with --tokenizer, else words]")
@click.option("--sharegpt-output-len", type=int, default=None,
              help="max_tokens of every ShareGPT request; default: the length of the recorded reply.")
@click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
              help="Tokenizer directory for token-id prompts and token counts.")
@click.option("--request-rate", type=float, default=math.inf, show_default=True,
              help="Requests per second (Poisson arrivals); inf sends all at once.")
@click.option("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
@click.option("--ignore-eos", is_flag=True, help="Generate exactly max_tokens per request.")
@click.option("--api-key", default=None, help="Sent as 'Authorization: Bearer KEY'.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True, help="Seconds per request.")
@click.option("--result-file", type=click.Path(dir_okay=False), default="bench-serve.json", show_default=True,
              help="Where to write the figures and per-request results as JSON.")
def bench_serve(base_url, model, endpoint, num_prompts, dataset_path, random_input_len, random_output_len,
                random_prompt, sharegpt_output_len, tokenizer, request_rate, max_concurrency, ignore_eos, api_key,
                seed, timeout_s, result_file) -> None:
    """Stream NUM_PROMPTS requests to a server and report TTFT, TPOT, ITL, E2E latency and throughput."""
    from lmcompress.turbo import bench_serve as bench

    tok = _load_tokenizer(tokenizer)
    if dataset_path is not None:
        requests = bench.sharegpt_requests(dataset_path, num_prompts, seed, tok, sharegpt_output_len)
    else:
        as_ids = (random_prompt or ("ids" if tok is not None else "words")) == "ids"
        requests = bench.random_requests(num_prompts, random_input_len, random_output_len, seed, tok, as_ids)
    model = model or _first_model(base_url, api_key)
    config = bench.BenchConfig(base_url=base_url, model=model, endpoint=endpoint, request_rate=request_rate,
                               max_concurrency=max_concurrency, ignore_eos=ignore_eos, api_key=api_key,
                               timeout_s=timeout_s, seed=seed)
    results, duration = asyncio.run(bench.run_benchmark(requests, config))
    summary = bench.summarize(results, duration)
    click.echo(bench.format_table(summary))
    bench.write_result(result_file, config, summary, results)
    click.echo(f"wrote {result_file}", err=True)


def _load_tokenizer(path: str | None):
    if path is None:
        return None
    from lmcompress.turbo.engine import load_tokenizer

    return load_tokenizer(path)


def _first_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise LmcError(f"cannot list the models of {base_url} ({exc}); check --url or pass --model") from exc
