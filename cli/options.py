"""Option types shared by several subcommands."""

from __future__ import annotations

import click

from lmcompress.errors import LmcError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '512MiB', '1000000' -> bytes."""
    value = text.strip().upper().replace(" ", "")
    digits = value.rstrip("KMGIB")
    unit = value[len(digits):]
    if unit not in _UNITS or not digits:
        raise LmcError(f"cannot read size {text!r}; write it like 2GB, 512MiB or 1000000")
    return int(float(digits) * _UNITS[unit])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


device_option = click.option(
    "--device", default="auto", show_default=True,
    help="Compute device: auto (cuda if available), cpu, cuda or cuda:N.",
)
