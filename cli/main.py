"""The `lmc` command."""

import click


@click.group()
def cli() -> None:
    """lmcompress: calibrate, quantize and serve LLMs."""
