"""`lmc generate MODEL_DIR PROMPT` (one completion, streamed to stdout) and `lmc chat MODEL_DIR`
(an interactive conversation with history), both on the turbo engine in this process.

Ctrl-C during a reply stops that reply (its request is aborted); at the prompt it quits.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence

import click

from lmcompress.cli.engine_options import engine_options
from lmcompress.errors import LmcError
from lmcompress.turbo.config import EngineConfig

_CHAT_COMMANDS = "/reset clears the history, /exit (or Ctrl-D) quits"


def _sampling_options(temperature: float) -> Callable:
    options = (
        click.option("--max-tokens", type=int, default=256, show_default=True, help="Most tokens per reply."),
        click.option("--temperature", type=float, default=temperature, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
    )

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("prompt")
@_sampling_options(temperature=0.0)
@engine_options
def generate(config: EngineConfig, prompt: str, **sampling) -> None:
    """Complete PROMPT (raw text, no chat template) and print the completion as it is generated."""
    from lmcompress.turbo.async_engine import AsyncEngine
    from lmcompress.turbo.engine import load_tokenizer

    engine = AsyncEngine(config)
    try:
        ids = load_tokenizer(config.tokenizer or config.model)(prompt)["input_ids"]
        _reply(engine, ids, _params(engine, ids, sampling))
    finally:
        engine.shutdown()


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--system", default=None, help="A system message that starts the conversation.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Jinja chat template file replacing the tokenizer's (default when it has none: ChatML).")
@_sampling_options(temperature=0.7)
@engine_options
def chat(config: EngineConfig, system: str | None, chat_template: str | None, **sampling) -> None:
    """Talk to MODEL_DIR in the terminal; the whole conversation is the prompt of every reply."""
    from lmcompress.turbo.async_engine import AsyncEngine
    from lmcompress.turbo.engine import load_tokenizer
    from lmcompress.turbo.server.chat_template import ChatRenderer

    engine = AsyncEngine(config)
    try:
        # A tokenizer of its own: the engine thread's may be decoding an aborted reply's last step.
        renderer = ChatRenderer(load_tokenizer(config.tokenizer or config.model), chat_template)
        opening = [{"role": "system", "content": system}] if system else []
        click.echo(f"chatting with {config.model} ({_CHAT_COMMANDS})", err=True)
        _conversation(engine, renderer, opening, sampling)
    finally:
        engine.shutdown()


def _conversation(engine, renderer, opening: list[dict], sampling: dict) -> None:
    history = list(opening)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(opening)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        history, ids = _fit(engine, renderer, history, len(opening), sampling["max_tokens"])
        click.echo("assistant> ", nl=False)
        history.append({"role": "assistant", "content": _reply(engine, ids, _params(engine, ids, sampling))})


def _fit(engine, renderer, history: list[dict], keep: int, max_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest turns (after the first `keep` messages) until the prompt leaves room for a reply."""
    limit = _context_limit(engine)
    ids = renderer.token_ids(history)
    while len(ids) + min(max_tokens, limit // 2) > limit and len(history) > keep + 1:
        history = history[:keep] + history[keep + 1:]
        ids = renderer.token_ids(history)
        click.echo("(dropped the oldest turn to fit the model's context)", err=True)
    return history, ids


def _context_limit(engine) -> int:
    return min(engine.engine.model_runner.max_model_len, engine.kv_capacity_tokens)


def _params(engine, prompt_ids: Sequence[int], sampling: dict):
    """SamplingParams with max_tokens cut to the room the context leaves after the prompt."""
    from lmcompress.turbo.sampling_params import SamplingParams

    room = _context_limit(engine) - len(prompt_ids)
    if room < 1:
        raise LmcError(f"the prompt has {len(prompt_ids)} tokens and fills the model's context "
                       f"({_context_limit(engine)} tokens); shorten it")
    return SamplingParams(**{**sampling, "max_tokens": min(sampling["max_tokens"], room)})


def _reply(engine, prompt_ids: Sequence[int], params) -> str:
    """Stream one completion to stdout; returns its text (what was shown, if Ctrl-C stopped it)."""
    shown: list[str] = []
    try:
        asyncio.run(_stream(engine, prompt_ids, params, shown))
    except KeyboardInterrupt:
        click.echo(" [stopped]", err=True)
    else:
        click.echo()
    return "".join(shown)


async def _stream(engine, prompt_ids: Sequence[int], params, shown: list[str]) -> None:
    async for out in engine.generate(list(prompt_ids), params):
        for choice in out.outputs:
            if choice.error:
                raise LmcError(choice.error)
            shown.append(choice.text)
            sys.stdout.write(choice.text)
            sys.stdout.flush()
