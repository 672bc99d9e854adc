"""`lmc quantize`."""

from __future__ import annotations

import click

from lmcompress.cli.options import device_option, human_bytes, parse_size
from lmcompress.pipeline import QuantizeOptions, QuantizeSummary, quantize_checkpoint
from lmcompress.quant.qtensor import QuantConfig


@click.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--method", type=click.Choice(["awq", "gptq", "rtn"]), default="awq", show_default=True,
              help="Quantization algorithm.")
@click.option("--format", "fmt", type=click.Choice(["awq", "gptq"]), default=None,
              help="Output layout: AutoAWQ GEMM (awq) or GPTQ v1 (gptq). Default: gptq for --method gptq, else awq.")
@click.option("--bits", type=int, default=4, show_default=True, help="Weight bits (4).")
@click.option("--group-size", type=int, default=128, show_default=True, help="Quantization group size: 32, 64 or 128.")
@click.option("--sym", is_flag=True, help="Symmetric quantization (GPTQ format only).")
@click.option("--calib-data", default="pileval", show_default=True,
              help="Calibration text: a local .txt/.jsonl/.json/.parquet file or directory, or pileval/wikitext2/c4 when cached.")
@click.option("--calib-samples", type=int, default=128, show_default=True, help="Number of calibration sequences.")
@click.option("--calib-seqlen", type=int, default=512, show_default=True, help="Tokens per calibration sequence.")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed for sampling calibration sequences.")
@device_option
@click.option("--no-clip", is_flag=True, help="AWQ: skip the weight-clipping search.")
@click.option("--no-duo-scaling", is_flag=True, help="AWQ: scales from activations only.")
@click.option("--no-gqa-scaling", is_flag=True,
              help="AWQ: under grouped-query attention, skip the v_proj -> o_proj scales (as AutoAWQ does) "
                   "instead of sharing each value channel's scale across the query heads that read it.")
@click.option("--range-search/--no-range-search", default=None,
              help="Take each group's quantization range from GPTQ's MSE shrink search instead of its plain "
                   "min/max (AWQ: while it picks its scales).  Default: on for GPTQ, off for AWQ (no gain there "
                   "on the reference model, at 5x the time).")
@click.option("--act-order", is_flag=True, help="GPTQ: quantize columns in order of decreasing Hessian diagonal.")
@click.option("--damp-percent", type=float, default=0.01, show_default=True,
              help="GPTQ: damping as a fraction of mean(diag H); raised automatically if Cholesky fails.")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Largest safetensors shard, e.g. 2GB, 500MiB.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def quantize(src, out, method, fmt, bits, group_size, sym, calib_data, calib_samples, calib_seqlen, seed, device,
             no_clip, no_duo_scaling, no_gqa_scaling, range_search, act_order, damp_percent, max_shard_size,
             overwrite) -> None:
    """Quantize the Hugging Face checkpoint SRC to 4 bits into OUT, with KV-cache scales.

    Layers are calibrated one at a time, so peak memory follows one decoder layer.
    OUT is written to a temporary directory and renamed only when complete.
    """
    method_options = {
        "awq": {"clip": not no_clip, "duo_scaling": not no_duo_scaling, "gqa_scaling": not no_gqa_scaling},
        "gptq": {"act_order": act_order, "damp_percent": damp_percent},
        "rtn": {},
    }[method]
    if range_search is not None and method != "rtn":
        method_options["range_search"] = range_search
    options = QuantizeOptions(
        method=method, quant=QuantConfig(bits=bits, group_size=group_size, sym=sym),
        fmt=fmt or ("gptq" if method == "gptq" else "awq"),
        calib_data=calib_data, calib_samples=calib_samples, calib_seqlen=calib_seqlen, seed=seed,
        device=device, method_options=method_options, max_shard_bytes=parse_size(max_shard_size),
    )
    summary = quantize_checkpoint(src, out, options, overwrite=overwrite)
    click.echo(format_summary(summary))


def format_summary(s: QuantizeSummary) -> str:
    ratio = s.output_bytes / s.input_bytes if s.input_bytes else float("nan")
    memory = "peak GPU memory" if s.peak_memory_kind == "gpu_allocated" else "peak process memory"
    return (
        f"wrote {s.out_dir} in {s.seconds:.1f} s; {memory} {human_bytes(s.peak_memory_bytes)}; "
        f"size {human_bytes(s.output_bytes)} vs {human_bytes(s.input_bytes)} input ({ratio:.2f}x)"
    )
