"""`lmc eval`: accuracy measurements that `lmc report` composes, each runnable alone."""

from __future__ import annotations

import click

from lmcompress.cli.options import device_option
from lmcompress.errors import LmcError


@click.group("eval")
def eval_group() -> None:
    """Evaluate a float or quantized checkpoint."""


@eval_group.command("ppl")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", required=True,
              help="Evaluation text: a local .txt/.jsonl/.json/.parquet file, or wikitext2 when cached.")
@click.option("--max-length", type=int, default=None, help="Window length in tokens (default: min(model context, 2048)).")
@click.option("--stride", type=int, default=None, help="Tokens between window starts (default: max-length / 2).")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens of the text.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON.")
@click.option("--kv-cache-dtype", default=None,
              help="Run through turbo with this KV cache dtype (fp16, bf16, fp32, int8, int4), so the KV dtype counts.")
@device_option
def ppl(model_dir, data, max_length, stride, max_tokens, json_path, kv_cache_dtype, device) -> None:
    """Sliding-window perplexity of MODEL_DIR on --data.

    Quantized checkpoints (lmc, AutoAWQ, GPTQ) run through a dequantizing
    reference path, so the number measures the weights, not a kernel; with
    --kv-cache-dtype they run through turbo's model runner and paged KV cache
    instead.  bitsandbytes checkpoints (lmc report's bnb-nf4/bnb-int8) run
    through transformers with a float16 KV cache.
    """
    from lmcompress.evaluate import evaluate_checkpoint
    from lmcompress.report.bnb import is_bnb_checkpoint

    if kv_cache_dtype is None and not is_bnb_checkpoint(model_dir):
        result = evaluate_checkpoint(model_dir, data, device=device, max_length=max_length, stride=stride,
                                     max_tokens=max_tokens, json_path=json_path)
    else:
        result = _engine_perplexity(model_dir, data, kv_cache_dtype or "fp16", device, max_length, stride,
                                    max_tokens, json_path)
    click.echo(f"perplexity {result.ppl:.4f} over {result.num_tokens} tokens "
               f"(window {result.max_length}, stride {result.stride}) for {model_dir}")


def _engine_perplexity(model_dir: str, data: str, kv_cache_dtype: str, device: str, max_length: int | None,
                       stride: int | None, max_tokens: int | None, json_path: str | None):
    from lmcompress.calib.data import load_eval_text
    from lmcompress.evaluate import write_result_json
    from lmcompress.report.engines import measure_perplexity, open_engine
    from lmcompress.report.provenance import environment
    from lmcompress.resources import resolve_device

    torch_device = resolve_device(device)
    engine = open_engine(model_dir, kv_cache_dtype, torch_device, max_length)
    result = measure_perplexity(engine, model_dir, load_eval_text(data), max_tokens, max_length, stride)
    if json_path is not None:
        write_result_json(json_path, result, extra={
            "model": str(model_dir), "data": str(data), "max_tokens": max_tokens, "engine": engine.name,
            "kv_cache_dtype": kv_cache_dtype, **environment(torch_device),
        })
    return result


@eval_group.command("task")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--task", "task_spec", default="builtin", show_default=True,
              help='builtin (held-out continuation, 4 choices) or a JSONL file of '
                   '{"context", "choices", "gold"} lines.')
@click.option("--limit", type=int, default=None, help="Score only the first N items.")
@click.option("--kv-cache-dtype", default="fp16", show_default=True,
              help="KV cache dtype of turbo (fp16, bf16, fp32, int8, int4); bitsandbytes checkpoints take fp16 only.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the result as JSON.")
@device_option
def task(model_dir, task_spec, limit, kv_cache_dtype, json_path, device) -> None:
    """Multiple-choice accuracy of MODEL_DIR, each choice scored by its log-likelihood after the context.

    Reports acc (highest summed log-probability) and acc_norm (divided by the
    choice's length in characters), as lm-eval-harness does.
    """
    from dataclasses import asdict

    from lmcompress.report.engines import measure_task, open_engine
    from lmcompress.report.files import write_json_atomic
    from lmcompress.report.provenance import environment
    from lmcompress.report.tasks import load_task
    from lmcompress.resources import resolve_device

    if limit is not None and limit < 1:
        raise LmcError(f"--limit {limit} scores no item; pass a positive number or leave it out")
    loaded = load_task(task_spec)
    torch_device = resolve_device(device)
    engine = open_engine(model_dir, kv_cache_dtype, torch_device)
    result = measure_task(engine, model_dir, loaded, limit)
    if json_path is not None:
        write_json_atomic(json_path, {
            "model": str(model_dir), "task_file": loaded.source, "sha256": loaded.sha256, "engine": engine.name,
            "kv_cache_dtype": kv_cache_dtype, **environment(torch_device), **asdict(result),
        })
    click.echo(f"{result.task}: acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f} over {result.num_items} items "
               f"({engine.name}, KV {kv_cache_dtype}) for {model_dir}")
