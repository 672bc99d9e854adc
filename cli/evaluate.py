"""`lmc eval`: accuracy measurements that `lmc report` composes, each runnable alone."""

from __future__ import annotations

import click

from lmcompress.cli.options import device_option


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
@device_option
def ppl(model_dir, data, max_length, stride, max_tokens, json_path, device) -> None:
    """Sliding-window perplexity of MODEL_DIR on --data.

    Quantized checkpoints (lmc, AutoAWQ, GPTQ) run through a dequantizing
    reference path, so the number measures the weights, not a kernel.
    """
    from lmcompress.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(model_dir, data, device=device, max_length=max_length, stride=stride,
                                 max_tokens=max_tokens, json_path=json_path)
    click.echo(f"perplexity {result.ppl:.4f} over {result.num_tokens} tokens "
               f"(window {result.max_length}, stride {result.stride}) for {model_dir}")
