"""`lmc demo`: the whole loop on the bundled reference model, for a first run on a fresh machine."""

from __future__ import annotations

from pathlib import Path

import click

from lmcompress.cli.options import device_option
from lmcompress.cli.quantize import format_summary

DEMO_PROMPT = "The meaning of the word"


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="lmc-demo", show_default=True,
              help="Where to write the quantized reference model and results.")
@click.option("--method", type=click.Choice(["awq", "gptq", "rtn"]), default="awq", show_default=True)
@click.option("--calib-samples", type=int, default=32, show_default=True, help="Calibration sequences of 512 tokens.")
@click.option("--eval-tokens", type=int, default=40000, show_default=True,
              help="Held-out tokens to score (the whole held-out text is ~100k tokens).")
@device_option
def demo(out_dir, method, calib_samples, eval_tokens, device) -> None:
    """Quantize the reference model, compare perplexity before and after, and generate a few tokens."""
    from lmcompress import reference
    from lmcompress.evaluate import evaluate_checkpoint
    from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint

    src = reference.REFERENCE_MODEL_DIR
    quantized = Path(out_dir) / f"ref-llama-{method}"
    click.echo(f"reference model: {src}")
    options = QuantizeOptions(method=method, fmt="gptq" if method == "gptq" else "awq",
                              calib_data=str(reference.REFERENCE_CALIB), calib_samples=calib_samples, device=device)
    click.echo(format_summary(quantize_checkpoint(src, quantized, options, overwrite=True)))

    results = {}
    for label, model_dir in (("fp16", src), (method, quantized)):
        results[label] = evaluate_checkpoint(model_dir, str(reference.REFERENCE_HELDOUT), device=device,
                                             max_length=512, max_tokens=eval_tokens,
                                             json_path=Path(out_dir) / f"ppl-{label}.json").ppl
    increase = 100 * (results[method] / results["fp16"] - 1)
    click.echo(f"held-out perplexity: fp16 {results['fp16']:.3f}, {method} W4 g128 {results[method]:.3f} "
               f"({increase:+.2f}%)")
    click.echo(f"generate ({method}): {DEMO_PROMPT!r} -> {_generate(quantized, DEMO_PROMPT, device)!r}")


def _generate(model_dir: Path, prompt: str, device: str, max_new_tokens: int = 24) -> str:
    from transformers import AutoTokenizer

    from lmcompress.formats.loader import load_dequantized_model
    from lmcompress.resources import resolve_device

    torch_device = resolve_device(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_dequantized_model(model_dir, device=torch_device)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(torch_device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
