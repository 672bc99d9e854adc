"""The README's commands: the two quickstart commands (CI runs the second), and every `lmc` example parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from lmcompress.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


def _commands() -> list[str]:
    """Each `lmc ...` command of the README's bash blocks, comments dropped, `a && b` split."""
    lines = (line.split("  #")[0].strip() for block in _bash_blocks(README) for line in block.splitlines())
    return [part.strip() for line in lines for part in line.split("&&") if part.strip().startswith("lmc ")]


def _parse(argv: list[str]) -> click.Context:
    """argv resolved down to its subcommand and parsed as click would run it, without running it (the README
    gives no group options, so each group's first argument names its subcommand)."""
    ctx, command, name = None, cli, "lmc"
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=name, parent=ctx)
        name, argv = argv[0], argv[1:]
        command = command.get_command(ctx, name)
        assert command is not None, f"lmc has no subcommand {name!r} there"
    return command.make_context(name, argv, parent=ctx)


def test_quickstart_is_two_commands_and_ci_runs_the_test_one():
    quickstart = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [block.strip() for block in _bash_blocks(quickstart)]
    assert len(commands) == 2 and all("\n" not in command for command in commands)
    assert commands[0].endswith("lmc demo") and "pytest" in commands[1]
    assert (ROOT / ".ci/run").read_text().strip().splitlines()[-1] == commands[1]


@pytest.mark.parametrize("command", _commands(), ids=lambda command: " ".join(command.split()[:3]))
def test_readme_lmc_command_parses(command, tmp_path, monkeypatch):
    """Options renamed or dropped since the README was written fail here; the paths it names are stand-ins."""
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(command)[1:]
    for token in argv:
        if token.startswith("./"):
            Path(token).mkdir(parents=True, exist_ok=True)
        elif re.fullmatch(r"[\w.-]+\.(txt|jsonl)", token):
            Path(token).touch()
    ctx = _parse(argv)
    assert ctx.command.name == ctx.info_name  # the subcommand the README names, not a fallback
