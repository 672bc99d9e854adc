"""The FastAPI app of `lmc serve`: OpenAI-compatible routes over one AsyncEngine.

    app = build_app(AsyncEngine(EngineConfig(model=...)), ServerOptions(served_model_names=("ref-llama",)))
    uvicorn.run(app, host="127.0.0.1", port=23333)

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models,
GET /health (503 once the engine loop is dead), GET /metrics (Prometheus).
Two ASGI guards run before routing: API keys (Bearer, /v1 only) and the body
size limit, so neither depends on the body being valid JSON.
The app owns the engine: its shutdown (lifespan end) stops the engine thread.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmcompress.errors import LmcError
from lmcompress.turbo.async_engine import AsyncEngine
from lmcompress.turbo.engine import load_tokenizer
from lmcompress.turbo.server.admission import AdmissionQueue
from lmcompress.turbo.server.chat_template import ChatRenderer
from lmcompress.turbo.server.metrics import ServerMetrics
from lmcompress.turbo.server.openai_errors import OpenAIError, install_error_handlers
from lmcompress.turbo.server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from lmcompress.turbo.server.serving import OpenAIServing, ServedModel

DEFAULT_MAX_QUEUE = 1024
DEFAULT_MAX_BODY_BYTES = 8 * 2**20


@dataclass(frozen=True)
class ServerOptions:
    """served_model_names: names clients may put in `model`; the first is the default.
    api_keys: accepted Bearer tokens; empty = no authentication.
    max_queue: most requests waiting for admission; more get 429 with Retry-After.
    max_body_bytes: larger request bodies get 413.
    chat_template: a Jinja file replacing the tokenizer's chat template.
    """

    served_model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    chat_template: Path | None = None

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise LmcError("served model names must be non-empty; pass --served-model-name NAME")
        if self.max_queue < 0:
            raise LmcError(f"max queue must be >= 0, got {self.max_queue}; pass --max-queue 0 or more")
        if self.max_body_bytes < 1:
            raise LmcError(f"max body size must be >= 1 byte, got {self.max_body_bytes}; pass e.g. 8MiB")


def build_app(engine: AsyncEngine, options: ServerOptions) -> FastAPI:
    serving = _build_serving(engine, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="lmc serve", lifespan=lifespan)
    install_error_handlers(app)
    _add_routes(app, serving)
    app.add_middleware(_BodyLimit, max_bytes=options.max_body_bytes)
    app.add_middleware(_ApiKeyGuard, api_keys=options.api_keys)  # added last = runs first
    app.state.serving = serving
    return app


def _build_serving(engine: AsyncEngine, options: ServerOptions) -> OpenAIServing:
    llm = engine.engine
    config, runner = llm.config, llm.model_runner
    # The server tokenizes in the event loop's thread; its own tokenizer keeps it
    # from sharing the engine thread's (a tokenizer is not safe to use from two threads).
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = ServedModel(names=options.served_model_names, max_model_len=runner.max_model_len,
                        context_limit=min(runner.max_model_len, engine.kv_capacity_tokens),
                        vocab_size=runner.vocab_size, created=int(time.time()))
    admission = AdmissionQueue(slots=config.max_num_seqs, max_waiting=options.max_queue)
    metrics = ServerMetrics(engine.stats, lambda: admission.num_waiting, options.served_model_names[0])
    return OpenAIServing(engine, tokenizer, model, admission, metrics, ChatRenderer(tokenizer, options.chat_template))


def _add_routes(app: FastAPI, serving: OpenAIServing) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not serving.engine.is_alive:
            raise OpenAIError(503, "the turbo engine loop is not running; restart lmc serve", code="engine_dead")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return serving.model_list()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat_completions(body, request)


class _ApiKeyGuard:
    """401 for /v1 requests without `Authorization: Bearer <one of api_keys>`."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]):
        self.app, self.api_keys = app, tuple(key.encode() for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_keys and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # compare_digest on every key: the time taken says nothing about which prefix matched.
            if scheme.lower() != b"bearer" or not any([hmac.compare_digest(token, key) for key in self.api_keys]):
                error = OpenAIError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY'",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """413 for request bodies over max_bytes, whether declared by Content-Length or sent chunked.

    The body is read here in full (it is small by construction) and replayed to the app as one message.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = OpenAIError(413, f"the request body is larger than {self.max_bytes} bytes; send a smaller "
                                 "request (lmc serve --max-body-size raises the limit)", code="body_too_large")
        await error.response()(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives `body` once, then the connection's later messages (the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
