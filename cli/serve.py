"""`lmc serve MODEL_DIR`: the OpenAI-compatible HTTP server (FastAPI on uvicorn) over turbo."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

import click

from lmcompress.cli.engine_options import engine_options
from lmcompress.cli.options import parse_size
from lmcompress.errors import LmcError
from lmcompress.turbo.config import EngineConfig

DEFAULT_PORT = 23333


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=DEFAULT_PORT, show_default=True,
              help="Port to listen on; 0 picks a free one (the startup line says which).")
@click.option("--api-key", "api_keys", multiple=True,
              help="Accept requests to /v1 only with 'Authorization: Bearer KEY'; repeat for several keys.")
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="Name clients pass as `model`; repeatable; default: the model directory's name.")
@click.option("--max-queue", type=int, default=None,
              help="Most requests waiting for a free sequence slot; more get 429 with Retry-After. [default: 1024]")
@click.option("--max-body-size", default="8MiB", show_default=True, help="Larger request bodies get 413.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Jinja chat template file replacing the tokenizer's (default when it has none: ChatML).")
@click.option("--shutdown-timeout", type=int, default=30, show_default=True,
              help="Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are cancelled.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
@click.option("--access-log/--no-access-log", default=True, show_default=True, help="Log one line per request.")
@engine_options
def serve(config: EngineConfig, host, port, api_keys, served_model_names, max_queue, max_body_size, chat_template,
          shutdown_timeout, log_level, access_log) -> None:
    """Serve MODEL_DIR over HTTP: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    import uvicorn

    from lmcompress.turbo.async_engine import AsyncEngine
    from lmcompress.turbo.server.app import DEFAULT_MAX_QUEUE, ServerOptions, build_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServerOptions(
        served_model_names=tuple(served_model_names) or (Path(config.model).resolve().name,),
        api_keys=tuple(api_keys), max_queue=DEFAULT_MAX_QUEUE if max_queue is None else max_queue,
        max_body_bytes=parse_size(max_body_size), chat_template=Path(chat_template) if chat_template else None,
    )
    listener = _listen(host, port)  # before loading: a busy port fails in a second, not after the weights
    engine = AsyncEngine(config)
    try:
        app = build_app(engine, options)
    except BaseException:
        engine.shutdown()
        raise
    bound_host, bound_port = listener.getsockname()[:2]
    click.echo(f"lmc serve: listening on http://{bound_host}:{bound_port} as {', '.join(options.served_model_names)}"
               f"; {engine.engine.capacity_report().removeprefix('turbo: ')}", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, access_log=access_log,
                                           timeout_graceful_shutdown=shutdown_timeout))
    # uvicorn handles SIGINT and SIGTERM itself (stop accepting, let in-flight requests finish, stop the
    # engine) and then raises the signal again; both then end here as KeyboardInterrupt, and exit 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:
        pass
    click.echo("lmc serve: stopped", err=True)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise LmcError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or stop the "
                       "process that holds it") from exc
