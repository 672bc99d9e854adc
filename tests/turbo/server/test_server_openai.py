"""`lmc serve` driven by the official openai client: completions and chat, streamed and not, n > 1,
stop strings, seeds, logprobs, cached-token usage, metrics, and a client that leaves mid-stream."""

from __future__ import annotations

import json

import openai
import pytest

from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.engine import load_tokenizer
from lmcompress.turbo.llm import LLM
from lmcompress.turbo.sampling_params import SamplingParams

API_KEY = "sk-test-openai"
MODEL = "ref-llama"
PROMPTS = ["The king said", "And the LORD spake unto Moses, saying"]
REQUIRED_METRICS = [
    "lmc:num_requests_running", "lmc:num_requests_waiting", "lmc:kv_cache_usage_perc",
    "lmc:prefix_cache_queries_total", "lmc:prefix_cache_hits_total", "lmc:prompt_tokens_total",
    "lmc:generation_tokens_total", "lmc:num_preemptions_total", "lmc:time_to_first_token_seconds_count",
    "lmc:inter_token_latency_seconds_count", "lmc:e2e_request_latency_seconds_count",
    "lmc:request_queue_time_seconds_count",
]


@pytest.fixture(scope="module")
def server(start_lmc_server):
    with start_lmc_server("--served-model-name", MODEL, "--served-model-name", "alias", api_key=API_KEY) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def offline():
    """The same engine configuration, run in-process without HTTP: the expected outputs."""
    return LLM(REFERENCE_MODEL_DIR, device="cpu", block_size=16, num_kv_blocks=64, max_model_len=1024)


def test_models_lists_every_served_name(client):
    assert [model.id for model in client.models.list().data] == [MODEL, "alias"]


def test_greedy_completions_equal_offline_generation(client, offline):
    response = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=20, temperature=0)
    expected = offline.generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    assert [choice.index for choice in response.choices] == [0, 1]
    assert [choice.text for choice in response.choices] == [out.outputs[0].text for out in expected]
    assert [choice.finish_reason for choice in response.choices] == ["length", "length"]
    assert response.usage.prompt_tokens == sum(len(out.prompt_token_ids) for out in expected)
    assert response.usage.completion_tokens == 40
    assert response.usage.total_tokens == response.usage.prompt_tokens + 40
    assert response.model == MODEL


def test_default_max_tokens_is_16_and_alias_answers_as_itself(client):
    response = client.completions.create(model="alias", prompt=PROMPTS[0], temperature=0,
                                         extra_body={"ignore_eos": True})
    assert response.usage.completion_tokens == 16
    assert response.model == "alias"


def test_stream_carries_the_same_text_then_usage_then_done(client, server):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(text_chunks) > 1  # streamed token by token, not in one piece
    assert "".join(chunk.choices[0].text for chunk in text_chunks) == whole.choices[0].text
    assert [chunk.choices[0].finish_reason for chunk in text_chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 24
    with server.client() as http, http.stream("POST", "/v1/completions", json={
        "prompt": PROMPTS[1], "max_tokens": 3, "stream": True}) as response:
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    assert all(event.startswith("data: {") for event in events[:-2])


def test_chat_renders_the_template_and_equals_offline_generation(client, offline):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Who is the king?"}]
    tokenizer = load_tokenizer(REFERENCE_MODEL_DIR)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    (expected,) = offline.generate([prompt_ids], SamplingParams(max_tokens=12, temperature=0))
    response = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=12, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.object == "chat.completion"


def test_chat_stream_sends_the_role_first_and_usage_last(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    whole = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=6, temperature=0)
    assert content == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_n_choices_differ_and_a_seed_reproduces_them(client):
    def ask(seed):
        response = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=1.0, n=3,
                                             seed=seed, extra_body={"ignore_eos": True})
        assert sorted(choice.index for choice in response.choices) == [0, 1, 2]
        assert response.usage.completion_tokens == 36  # counted over all choices
        return [choice.text for choice in sorted(response.choices, key=lambda c: c.index)]

    first, again, other = ask(7), ask(7), ask(8)
    assert first == again
    assert len(set(first)) > 1  # each choice samples from its own seed (7, 8, 9)
    assert other != first
    assert other[:2] == first[1:]  # seed 8's choices 0 and 1 are seed 7's choices 1 and 2


def test_n_choices_stream_with_their_own_indices(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=1.0, n=2, seed=1,
        stream=True))
    assert {chunk.choices[0].index for chunk in chunks} == {0, 1}
    finished = [chunk.choices[0].index for chunk in chunks if chunk.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


def test_stop_string_and_stop_token_end_the_text(client):
    full = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0).choices[0]
    stop = full.text[10:14]
    assert stop and full.text.index(stop) >= 1
    stopped = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                        stop=[stop]).choices[0]
    assert stopped.text == full.text[:full.text.index(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.model_extra["stop_reason"] == stop
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == stopped.text

    first_token = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                            logprobs=0).choices[0]
    tokenizer = load_tokenizer(REFERENCE_MODEL_DIR)
    token_id = tokenizer(first_token.text, add_special_tokens=False)["input_ids"][0]
    by_token = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=24, temperature=0,
                                         extra_body={"stop_token_ids": [token_id]}).choices[0]
    assert by_token.finish_reason == "stop" and by_token.model_extra["stop_reason"] == token_id


def test_completion_logprobs_line_up_with_the_text(client):
    choice = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                       logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(logprobs.text_offset) == 8
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(8)]
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and top[token] == logprob
        assert logprob == max(top.values())  # greedy: the sampled token is the most likely one
        assert 1 <= len(top) <= 3


def test_chat_logprobs_have_top_alternatives(client):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                              temperature=0, logprobs=True, top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert "".join(item.token for item in content) == response.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token and item.top_logprobs[0].logprob == item.logprob
        assert bytes(item.bytes).decode() == item.token


def test_repeated_long_prompt_reports_cached_tokens(client, server):
    prompt = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    before = server.metrics()["lmc:prefix_cache_hits_total"]
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > 16
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert server.metrics()["lmc:prefix_cache_hits_total"] >= before + cached


def test_client_leaving_mid_stream_aborts_and_frees_every_block(server):
    before = server.wait_idle()["lmc:generation_tokens_total"]
    with server.client() as http:
        with http.stream("POST", "/v1/completions", json={
            "prompt": PROMPTS[0], "max_tokens": 900, "ignore_eos": True, "temperature": 0, "stream": True,
        }) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: {")
                if events == 5:
                    assert server.metrics()["lmc:kv_cache_usage_perc"] > 0
                    break
    after = server.wait_idle()
    assert after["lmc:kv_cache_num_free_blocks"] == after["lmc:kv_cache_num_blocks"] == 64
    assert after["lmc:kv_cache_usage_perc"] == 0
    generated = after["lmc:generation_tokens_total"] - before
    assert 5 <= generated < 900  # aborted, not run to max_tokens
    assert server.metrics()["lmc:generation_tokens_total"] - before == generated  # and nothing runs any more


def test_metrics_expose_every_vllm_name_with_the_lmc_prefix(client, server):
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    metrics = server.metrics()
    missing = [name for name in REQUIRED_METRICS if name not in metrics]
    assert not missing
    assert metrics["lmc:time_to_first_token_seconds_count"] >= 1
    assert metrics["lmc:inter_token_latency_seconds_count"] >= 3
    assert metrics["lmc:prompt_tokens_total"] >= 4 and metrics["lmc:generation_tokens_total"] >= 4


def test_wrong_key_is_refused_by_the_client_library(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    assert json.loads(caught.value.response.text)["error"]["type"] == "authentication_error"
