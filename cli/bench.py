"""`lmc bench`: benchmarks.

    lmc bench serve          streaming requests against a running OpenAI-compatible server
    lmc bench throughput     the turbo engine in-process: fixed random prompts, N requests, concurrency C
    lmc bench hf             the transformers generate() baseline on one static batch
    lmc bench kernels        turbo's CUDA kernels against the copy bandwidth and matmul rate of the same GPU

throughput, hf and kernels print a table and, with --json PATH, write their figures with the
device, library versions, date and command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import importlib.metadata
import json
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import click
import torch

from lmcompress import __version__
from lmcompress.cli.engine_options import engine_options
from lmcompress.cli.options import device_option
from lmcompress.errors import LmcError
from lmcompress.resources import resolve_device
from lmcompress.turbo.config import DTYPE_ALIASES, EngineConfig


@click.group("bench")
def bench_group() -> None:
    """Measure serving, engine and kernel performance."""


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
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise LmcError(f"cannot list the models of {base_url} ({exc}); check --url or pass --model") from exc


# --- throughput, hf, kernels ----------------------------------------------------------------------

json_option = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                           help="Also write the figures, device, versions, date and command line here.")


def _lengths(command):
    for option in reversed((
        click.option("--input-len", type=int, default=128, show_default=True, help="Prompt tokens per request."),
        click.option("--output-len", type=int, default=128, show_default=True,
                     help="Tokens generated per request (EOS never stops one early)."),
    )):
        command = option(command)
    return command


@bench_group.command("throughput")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--dummy", is_flag=True, help="Random weights from config.json alone (the directory still needs "
                                           "tokenizer files, or pass --tokenizer).")
@click.option("--quant", type=click.Choice(["none", "awq-w4g128"]), default="none", show_default=True,
              help="With --dummy: random 4-bit AWQ-style linears (group 128) instead of float ones.")
@click.option("--num-prompts", type=int, default=256, show_default=True)
@_lengths
@click.option("--concurrency", type=int, default=None,
              help="Most requests in flight; the engine runs with max_num_seqs = this. [default: --max-num-seqs]")
@click.option("--warmup-prompts", type=int, default=None,
              help="Requests of the warmup run (other prompts, up to 16 tokens out); 0 skips it. "
                   "[default: min(num-prompts, 2 x concurrency)]")
@click.option("--profile", is_flag=True,
              help="Profile the timed run (torch.profiler) and add device time per kernel to the table and JSON.")
@json_option
@engine_options
def bench_throughput(config: EngineConfig, dummy, quant, num_prompts, input_len, output_len, concurrency,
                     warmup_prompts, profile, json_path) -> None:
    """Offline throughput of the turbo engine on MODEL_DIR, like LMDeploy's profile_throughput: NUM_PROMPTS
    random prompts, output tok/s, TTFT/TPOT/ITL, memory, and per-step time in and outside the forward."""
    from lmcompress.turbo import bench_throughput as bench

    setup = bench.ThroughputConfig(num_prompts=num_prompts, input_len=input_len, output_len=output_len,
                                   concurrency=concurrency or config.max_num_seqs, seed=config.seed or 0,
                                   warmup_prompts=warmup_prompts)
    result = bench.run_throughput(dataclasses.replace(config, dummy_weights=dummy), setup, quant, profile)
    tables = [("Turbo throughput", ["figure", "value"], bench.table_rows(result))]
    if profile:
        tables.append(("Device time per kernel", ["kernel", "calls", "us / step", "share"], bench.kernel_rows(result)))
    _report("throughput", torch.device(result["setup"]["device"]), result, tables, json_path)


@bench_group.command("prefix")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--dummy", is_flag=True, help="Random weights from config.json alone.")
@click.option("--quant", type=click.Choice(["none", "awq-w4g128"]), default="none", show_default=True,
              help="With --dummy: random 4-bit AWQ-style linears (group 128).")
@click.option("--prefix-len", type=int, default=32768, show_default=True, help="Tokens of the shared context.")
@click.option("--question-len", type=int, default=32, show_default=True, help="New tokens of each turn's question.")
@click.option("--output-len", type=int, default=32, show_default=True, help="Tokens of each turn's answer.")
@json_option
@engine_options
def bench_prefix(config: EngineConfig, dummy, quant, prefix_len, question_len, output_len, json_path) -> None:
    """Time to first token of a conversation's second turn against its first, both sharing a PREFIX_LEN-token
    context: what prefix caching saves (compare with --disable-prefix-caching)."""
    from lmcompress.turbo import bench_prefix as bench
    from lmcompress.turbo.bench_throughput import DUMMY_QUANT

    setup = bench.PrefixBenchConfig(prefix_len=prefix_len, question_len=question_len, output_len=output_len,
                                    seed=config.seed or 0)
    result = bench.run_prefix_bench(dataclasses.replace(config, dummy_weights=dummy), setup, DUMMY_QUANT[quant])
    _report("prefix", resolve_device(config.device), result,
            [("Prefix caching, two turns", ["figure", "value"], bench.table_rows(result))], json_path)


@bench_group.command("hf")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--dummy", is_flag=True, help="Random weights from config.json alone (AutoModelForCausalLM.from_config).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@_lengths
@click.option("--cache", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="static: preallocated KV cache, and on CUDA generate() compiles its decoding step.")
@click.option("--dtype", default="bf16", show_default=True, help="float16, bfloat16 or float32 (or fp16, bf16, fp32).")
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the prompts and dummy weights.")
@json_option
def bench_hf(model_dir, dummy, batch_size, input_len, output_len, cache, dtype, device, seed, json_path) -> None:
    """Hugging Face transformers generate() on MODEL_DIR: BATCH_SIZE random prompts at once, exactly
    OUTPUT_LEN greedy tokens each; output tok/s after a warmup call (the baseline turbo is measured against)."""
    from lmcompress.turbo import bench_hf as bench

    setup = bench.HFBenchConfig(batch_size=batch_size, input_len=input_len, output_len=output_len, cache=cache,
                                seed=seed)
    target = resolve_device(device)
    model = bench.load_hf_model(model_dir, dummy, _torch_dtype(dtype), target, seed)
    result = bench.run_hf_bench(model, setup)
    result["config"].update(model=str(model_dir), dummy=dummy)
    _report("hf", target, result, [("transformers generate()", ["figure", "value"], bench.table_rows(result))],
            json_path)


@bench_group.command("kernels")
@device_option
@click.option("--dtype", default="bf16", show_default=True,
              help="Activations, dense weights, W4 scales and float KV: bfloat16 or float16.")
@json_option
def bench_kernels(device, dtype, json_path) -> None:
    """Time turbo's CUDA kernels (W4A16 linear, paged decode attention over float/int8/int4 KV, fused
    norms) at Llama-2-7B shapes, against the copy bandwidth and matmul rate measured in the same run.
    Decode-sized calls are timed inside CUDA graphs, as decode steps run them; prompt-sized ones eagerly."""
    from lmcompress.turbo import bench_kernels as bench

    target = resolve_device(device)
    bench.require_kernel_device(target)
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype not in (torch.float16, torch.bfloat16):
        raise LmcError(f"--dtype {dtype} is not a 16-bit float; the kernels take bfloat16 or float16, pass one")
    config = bench.KernelBenchConfig(dtype=torch_dtype)
    result = bench.run_kernel_bench(config, target, bench.cuda_timers())
    _report("kernels", target, {"config": config.to_dict(), **result.to_dict()}, bench.tables(result), json_path)


def _torch_dtype(name: str) -> torch.dtype:
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in ("float16", "bfloat16", "float32"):
        raise LmcError(f"unknown --dtype {name!r}; use float16, bfloat16 or float32 (or fp16, bf16, fp32)")
    return getattr(torch, canonical)


def bench_environment(device: torch.device, command: str, options: dict) -> dict:
    """What produced a result: device, library versions, UTC date, the command and its options."""
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "triton": version("triton"), "transformers": version("transformers"),
        "python": platform.python_version(), "lmcompress": __version__,
        "command": command, "options": options, "argv": sys.argv,
    }


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = (str(cell) for cell in cells)
        return "  ".join([first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:]))])

    rule = "-" * len(line(header))
    return "\n".join([title, rule, line(header), rule, *(line(row) for row in rows), rule])


def _report(name: str, device: torch.device, result: dict, tables: list, json_path: str | None) -> None:
    click.echo("\n\n".join(format_table(*table) for table in tables))
    if json_path is not None:
        context = click.get_current_context()
        record = {"bench": name, "env": bench_environment(device, context.command_path, context.params), **result}
        Path(json_path).write_text(json.dumps(record, indent=2, default=str) + "\n")
        click.echo(f"wrote {json_path}", err=True)
