"""The app in-process over a real AsyncEngine: a dead engine loop gives 503 on /health and on new
requests, and a request in flight when the loop dies ends with an error event, not a hung stream."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.async_engine import AsyncEngine
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.server.app import ServerOptions, build_app

TIMEOUT_S = 60


@pytest.fixture
def engine():
    engine = AsyncEngine(EngineConfig(model=REFERENCE_MODEL_DIR, device="cpu", block_size=16, num_kv_blocks=32,
                                      max_model_len=256))
    yield engine
    engine.shutdown()


def _ask(app, method: str, path: str, **kwargs) -> httpx.Response:
    async def call() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(asyncio.wait_for(call(), TIMEOUT_S))


def _break_the_engine_loop(engine: AsyncEngine) -> None:
    def step():
        raise RuntimeError("simulated device failure")

    engine.engine.step = step


def test_stopped_engine_answers_503(engine):
    app = build_app(engine, ServerOptions(served_model_names=("ref",)))
    assert _ask(app, "GET", "/health").status_code == 200
    engine.shutdown()
    health = _ask(app, "GET", "/health")
    assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
    refused = _ask(app, "POST", "/v1/completions", json={"prompt": "x"})
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "service_unavailable"


def test_engine_dying_mid_request_ends_the_stream_with_an_error_event(engine):
    app = build_app(engine, ServerOptions(served_model_names=("ref",)))
    _break_the_engine_loop(engine)
    streamed = _ask(app, "POST", "/v1/completions", json={"prompt": "The king said", "stream": True})
    events = [e for e in streamed.text.split("\n\n") if e]
    assert streamed.status_code == 200  # the stream had started: the error travels inside it
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert "simulated device failure" in error["message"] and error["code"] == "engine_error"
    assert not engine.is_alive
    assert _ask(app, "GET", "/health").status_code == 503


def test_engine_dying_under_a_whole_answer_gives_503(engine):
    app = build_app(engine, ServerOptions(served_model_names=("ref",)))
    _break_the_engine_loop(engine)
    response = _ask(app, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                              "max_tokens": 4})
    assert response.status_code == 503 and "restart" in response.json()["error"]["message"]


def test_whole_answers_decode_their_text_once_and_match_the_stream(engine):
    # A non-streamed request's text is read only at its end, so the engine decodes it once (stream_text=False);
    # the streamed request decodes as it goes.  Both must give the same greedy text.
    seen = []
    add_request = engine.engine.add_request

    def spy(request_id, prompt, params=None, stream_text=True):
        seen.append(stream_text)
        add_request(request_id, prompt, params, stream_text)

    engine.engine.add_request = spy
    app = build_app(engine, ServerOptions(served_model_names=("ref",)))
    body = {"prompt": "The king said", "max_tokens": 12, "temperature": 0}
    whole = _ask(app, "POST", "/v1/completions", json=body).json()["choices"][0]["text"]
    streamed = _ask(app, "POST", "/v1/completions", json=body | {"stream": True})
    chunks = [json.loads(e[6:]) for e in streamed.text.split("\n\n") if e and e != "data: [DONE]"]
    assert seen == [False, True]
    assert whole and whole == "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])


def test_bad_server_options_raise_lmc_errors():
    with pytest.raises(LmcError, match="served model names"):
        ServerOptions(served_model_names=())
    with pytest.raises(LmcError, match="--max-queue"):
        ServerOptions(served_model_names=("m",), max_queue=-1)
