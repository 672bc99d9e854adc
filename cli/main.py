"""The `lmc` command: one click group; each subcommand lives in its own module."""

from __future__ import annotations

import sys

import click

from lmcompress import __version__
from lmcompress.errors import LmcError


class LmcGroup(click.Group):
    """Turns LmcError into a one-line message (exit 2) and Ctrl-C into a clean exit (130)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LmcError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: stopped; no partial output was left in place", err=True)
            sys.exit(130)


@click.group(cls=LmcGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lmc")
def cli() -> None:
    """lmcompress: calibrate, quantize and serve LLMs.

    \b
    lmc quantize SRC OUT      4-bit AWQ / GPTQ / RTN weights plus KV-cache scales
    lmc eval ppl MODEL        perplexity of a float or quantized checkpoint
    lmc eval task MODEL       multiple-choice accuracy by log-likelihood
    lmc report SRC            every method and KV dtype side by side
    lmc demo                  the whole loop on the bundled reference model
    lmc serve MODEL           OpenAI-compatible HTTP server on the turbo engine
    lmc generate MODEL TEXT   one completion, streamed to the terminal
    lmc chat MODEL            a conversation in the terminal
    lmc bench serve           serving benchmark against any OpenAI-compatible server
    lmc bench throughput      offline throughput and latency of turbo (N requests, fixed lengths)
    lmc bench hf              the same workload through transformers generate(), the baseline
    lmc bench kernels         turbo's GPU kernels against copy bandwidth and cuBLAS, one run
    """


def _register() -> None:
    from lmcompress.cli import demo, evaluate, quantize
    from lmcompress.cli import report

    cli.add_command(quantize.quantize)
    cli.add_command(evaluate.eval_group)
    cli.add_command(demo.demo)
    cli.add_command(report.report)
    from lmcompress.cli import bench, chat, serve

    cli.add_command(serve.serve)
    cli.add_command(chat.chat)
    cli.add_command(chat.generate)
    cli.add_command(bench.bench_group)


_register()
