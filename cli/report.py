"""`lmc report`: quantize with every method, evaluate each with every KV dtype, compare side by side."""

from __future__ import annotations

from pathlib import Path

import click

from lmcompress.cli.options import device_option, parse_size
from lmcompress.report.matrix import METHODS

DEFAULT_KV = "fp16,int8,int4"


@click.command()
@click.argument("src", type=click.Path(file_okay=False))
@click.option("--methods", default=",".join(METHODS), show_default=True, help="Comma list of methods to compare.")
@click.option("--kv", "kv_dtypes", default=DEFAULT_KV, show_default=True, help="Comma list of KV cache dtypes.")
@click.option("--eval-data", default=None,
              help="Perplexity text: a local .txt/.jsonl/.json/.parquet file, or wikitext2 when cached. "
                   "Needed unless accuracy is not applicable (--no-accuracy, or random weights).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report directory; finished cells under OUT/cells are reused by a rerun.")
@click.option("--eval-tokens", type=int, default=None, help="Score only the first N tokens of the evaluation text.")
@click.option("--max-length", type=int, default=None, help="Perplexity window (default: min(model context, 2048)).")
@click.option("--stride", type=int, default=None, help="Tokens between window starts (default: max-length / 2).")
@click.option("--task", "tasks", multiple=True, default=("builtin",), show_default=True,
              help='Multiple-choice task: builtin, or a JSONL file of {"context", "choices", "gold"} lines. '
                   'Repeatable.')
@click.option("--task-limit", type=int, default=None, help="Score only the first N items of each task.")
@click.option("--context", type=int, default=4096, show_default=True,
              help="Tokens per sequence for the capacity column.")
@click.option("--gpu-mem", default="24GiB", show_default=True, help="GPU memory for the capacity column.")
@click.option("--activation-reserve", default="2GiB", show_default=True,
              help="Memory kept for activations and the CUDA context in the capacity column.")
@click.option("--calib-data", default="pileval", show_default=True, help="Calibration text for rtn/awq/gptq.")
@click.option("--calib-samples", type=int, default=128, show_default=True)
@click.option("--calib-seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True, help="Seed for sampling calibration sequences.")
@click.option("--group-size", type=int, default=128, show_default=True, help="Group size of the 4-bit methods.")
@device_option
@click.option("--bench-results", type=click.Path(dir_okay=False), default=None,
              help='Decode tokens/s per cell: JSON {"METHOD/KV": tokens_per_s, or the path of an lmc bench '
                   'serve --result-file or lmc bench throughput --json result, whose output tok/s is taken}.')
@click.option("--no-accuracy", is_flag=True,
              help="Skip perplexity and task accuracy (marked n/a): memory, capacity, quantize time and decode "
                   "columns only. Automatic for random-weight checkpoints (lmcompress.reference.dummy).")
def report(src, methods, kv_dtypes, eval_data, out_dir, eval_tokens, max_length, stride, tasks, task_limit, context,
           gpu_mem, activation_reserve, calib_data, calib_samples, calib_seqlen, seed, group_size, device,
           bench_results, no_accuracy) -> None:
    """Compare compression methods on SRC: accuracy cost against memory saving.

    Quantizes SRC with each of --methods (reusing what OUT already holds),
    evaluates each with each --kv cache dtype, and writes report.md,
    report.json, report.html and report.png to OUT.  Interrupted, it resumes
    where it stopped.  With random weights or --no-accuracy the accuracy
    columns read n/a and only the memory-side columns are measured.
    """
    from lmcompress.report.matrix import (
        ReportConfig, load_bench_results, parse_kv_dtypes, parse_methods, run_matrix,
    )
    from lmcompress.report.memory import GpuBudget
    from lmcompress.report.render import build_report, write_report

    config = ReportConfig(
        src=Path(src), out=Path(out_dir), methods=parse_methods(methods), kv_dtypes=parse_kv_dtypes(kv_dtypes),
        eval_data=eval_data, eval_tokens=eval_tokens, max_length=max_length, stride=stride, tasks=tuple(tasks),
        task_limit=task_limit, calib_data=calib_data, calib_samples=calib_samples, calib_seqlen=calib_seqlen,
        seed=seed, group_size=group_size, device=device,
        budget=GpuBudget(gpu_bytes=parse_size(gpu_mem), context=context,
                         activation_reserve_bytes=parse_size(activation_reserve)),
        decode_tokens_per_s=load_bench_results(bench_results) if bench_results else {},
        accuracy=not no_accuracy,
    )
    result = run_matrix(config)
    built = build_report(config, result, config.command())
    paths = write_report(built, config, config.out)
    skipped = len(built.rows) - len(built.measured())
    accuracy = (f"accuracy n/a ({built.accuracy_na})" if built.accuracy_na
                else f"Pareto frontier {', '.join(built.pareto_frontier) or 'empty'}")
    click.echo(f"wrote {paths['md']}, {paths['html'].name}, {paths['json'].name}, {paths['png'].name}: "
               f"cells: {len(built.measured())} measured, {skipped} skipped; {accuracy}")
