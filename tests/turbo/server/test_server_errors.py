"""Bad requests get OpenAI-style errors with 4xx statuses, never a 5xx and never a dead engine;
a full queue answers 429 with Retry-After; a client that gives up on a long answer frees its blocks."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

API_KEY = "sk-test-errors"
BODY_LIMIT = 64 * 1024
GOOD = {"model": "ref-llama", "prompt": "The king said", "max_tokens": 2}
CHAT = {"model": "ref-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
LONG = {"prompt": "The king said", "max_tokens": 600, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(start_lmc_server):
    args = ("--max-body-size", "64KiB", "--max-num-seqs", "2", "--max-queue", "1")
    with start_lmc_server(*args, api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def http(server):
    with server.client() as client:
        yield client


CASES = {
    # name: (path, body or raw bytes, expected status, expected param)
    "bad JSON": ("/v1/completions", b'{"prompt": "x",', 400, None),
    "body not an object": ("/v1/completions", [1, 2], 400, None),
    "prompt missing": ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    "prompt wrong type": ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    "max_tokens a string": ("/v1/completions", {**GOOD, "max_tokens": "10"}, 400, "max_tokens"),
    "max_tokens a bool": ("/v1/completions", {**GOOD, "max_tokens": True}, 400, "max_tokens"),
    "negative max_tokens": ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    "negative max_completion_tokens": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -4}, 400,
                                       "max_tokens"),
    "unknown model": ("/v1/completions", {**GOOD, "model": "gpt-4"}, 404, "model"),
    "prompt too long": ("/v1/completions", {**GOOD, "prompt": "word " * 1100}, 400, "prompt"),
    "prompt + max_tokens too long": ("/v1/completions", {**GOOD, "max_tokens": 1021}, 400, "max_tokens"),
    "chat prompt too long": ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "a b " * 600}]},
                             400, "prompt"),
    "token id outside the vocabulary": ("/v1/completions", {**GOOD, "prompt": [1, 2, 8192]}, 400, "prompt"),
    "negative token id": ("/v1/completions", {**GOOD, "prompt": [-1]}, 400, "prompt"),
    "empty prompt list": ("/v1/completions", {**GOOD, "prompt": []}, 400, "prompt"),
    "negative temperature": ("/v1/completions", {**GOOD, "temperature": -0.5}, 400, "temperature"),
    "temperature a string": ("/v1/completions", {**GOOD, "temperature": "hot"}, 400, "temperature"),
    "top_p zero": ("/v1/completions", {**GOOD, "top_p": 0}, 400, "top_p"),
    "min_p above one": ("/v1/completions", {**GOOD, "min_p": 1.5}, 400, "min_p"),
    "too many logprobs": ("/v1/completions", {**GOOD, "logprobs": 21}, 400, "logprobs"),
    "seed out of range": ("/v1/completions", {**GOOD, "seed": 2**70}, 400, "seed"),
    "empty stop string": ("/v1/completions", {**GOOD, "stop": [""]}, 400, "stop"),
    "n greedy": ("/v1/completions", {**GOOD, "n": 2, "temperature": 0}, 400, "n"),
    "n above the sequence slots": ("/v1/completions", {**GOOD, "n": 3, "temperature": 1}, 400, "n"),
    "stream_options without stream": ("/v1/completions", {**GOOD, "stream_options": {"include_usage": True}}, 400,
                                      "stream_options"),
    "unsupported penalty": ("/v1/completions", {**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    "no messages": ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages"),
    "message without role": ("/v1/chat/completions", {**CHAT, "messages": [{"content": "x"}]}, 400, "messages"),
    "image content": ("/v1/chat/completions",
                      {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    "top_logprobs without logprobs": ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    "json response format": ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400,
                             "response_format"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_gets_an_openai_error(http, name):
    path, body, status, param = CASES[name]
    response = (http.post(path, content=body, headers={"Content-Type": "application/json"})
                if isinstance(body, bytes) else http.post(path, json=body))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_auth_size_and_routing_errors(server, http):
    with httpx.Client(base_url=server.url, timeout=60) as anonymous:
        missing = anonymous.post("/v1/completions", json=GOOD)
        wrong = anonymous.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer nope"})
        not_bearer = anonymous.post("/v1/completions", json=GOOD, headers={"Authorization": API_KEY})
        assert anonymous.get("/health").status_code == 200  # health and metrics stay open
        assert anonymous.get("/metrics").status_code == 200
    for response in (missing, wrong, not_bearer):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    declared = http.post("/v1/completions", json={**GOOD, "prompt": "x" * BODY_LIMIT})
    chunked = http.post("/v1/completions", content=(b" " * 4096 for _ in range(20)),
                        headers={"Content-Type": "application/json"})
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/v1/nothing").json()["error"]["type"] == "not_found_error"


def test_engine_still_serves_after_bad_requests(http):
    assert http.get("/health").json() == {"status": "ok"}
    response = http.post("/v1/completions", json=GOOD)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


_FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # JSON has neither
_SCALARS = st.none() | st.booleans() | st.integers(-10, 10) | st.integers() | _FLOATS | st.text(max_size=20)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=4), max_leaves=12)
# Lengths that are wrong, or right but short: a random body never asks for a long generation.
_LENGTH = st.one_of(st.integers(1, 3), st.integers(1, 3), st.sampled_from([0, -1, 10**9, "4", 2.5, True]))


def _mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid-looking values two times in three, else any JSON scalar."""
    return st.one_of(valid, valid, _SCALARS)


_FIELDS = {
    "model": _mostly(st.sampled_from(["ref-llama", "other", ""])),
    "temperature": _mostly(st.floats(-0.5, 2)), "top_p": _mostly(st.floats(0, 1)),
    "top_k": _mostly(st.integers(-3, 50)), "min_p": _mostly(st.floats(0, 1.2)),
    "n": _mostly(st.integers(0, 2)), "seed": _mostly(st.integers(-1, 2**64)),
    "stop": _mostly(st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2)),
    "stop_token_ids": _mostly(st.lists(st.integers(-5, 10**6), max_size=3)), "stream": _mostly(st.booleans()),
    "stream_options": _mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": _mostly(st.integers(0, 25) | st.booleans()), "top_logprobs": _mostly(st.integers(0, 25)),
    "ignore_eos": _mostly(st.booleans()), "repetition_penalty": _mostly(st.floats(0, 3)),
}
_MESSAGE = st.fixed_dictionaries({"role": _mostly(st.sampled_from(["user", "system", "assistant"])),
                                  "content": _mostly(st.text(max_size=20))})
_PROMPTS = {
    "/v1/completions": st.fixed_dictionaries({"prompt": st.one_of(
        st.text(max_size=30), st.lists(st.integers(-1, 8192), min_size=1, max_size=5),
        st.lists(st.text(max_size=10), min_size=1, max_size=2), _JSON)}),
    "/v1/chat/completions": st.fixed_dictionaries({"messages": st.one_of(
        st.lists(_MESSAGE, min_size=1, max_size=3), st.lists(_MESSAGE, min_size=1, max_size=3), _JSON)}),
}


def _bodies(path: str) -> st.SearchStrategy:
    """Anything JSON, or a plausible request with up to four fields drawn from _FIELDS."""
    fields = st.lists(st.sampled_from(sorted(_FIELDS)), max_size=4, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: _FIELDS[name] for name in names}))
    lengths = st.fixed_dictionaries({"max_tokens": _LENGTH, "max_completion_tokens": _LENGTH})
    plausible = st.tuples(_PROMPTS[path], lengths, fields).map(
        lambda parts: {name: value for part in parts for name, value in part.items()})
    return st.one_of(_JSON, plausible, plausible)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_bodies_never_get_a_5xx(http, data):
    path = data.draw(st.sampled_from(sorted(_PROMPTS)))
    body = data.draw(_bodies(path))
    response = http.post(path, json=body)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_full_queue_answers_429_with_retry_after(server, http):
    streams_done = threading.Event()

    def long_stream() -> None:
        # Two hold the two sequence slots and one waits in the queue (its response starts
        # once admitted), until the test has seen the 429; leaving aborts them.
        with server.client() as own, own.stream("POST", "/v1/completions", json={**LONG, "stream": True}):
            streams_done.wait(60)

    threads = [threading.Thread(target=long_stream) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        _wait_for(server, lambda m: m["lmc:num_requests_running"] == 2 and m["lmc:num_requests_waiting"] == 1)
        refused = http.post("/v1/completions", json=GOOD)
    finally:
        streams_done.set()
        for thread in threads:
            thread.join(60)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    metrics = server.wait_idle()
    assert metrics["lmc:kv_cache_num_free_blocks"] == metrics["lmc:kv_cache_num_blocks"]
    assert http.post("/v1/completions", json=GOOD).status_code == 200


def test_client_timing_out_on_a_whole_answer_aborts_it(server, http):
    before = server.wait_idle()["lmc:generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=LONG, timeout=1.0)
    metrics = server.wait_idle()
    assert metrics["lmc:num_requests_running"] == 0
    assert metrics["lmc:kv_cache_num_free_blocks"] == metrics["lmc:kv_cache_num_blocks"]
    assert metrics["lmc:generation_tokens_total"] - before < LONG["max_tokens"]


def _wait_for(server, condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition(server.metrics()):
        assert time.monotonic() < deadline, server.metrics()
        time.sleep(0.05)
