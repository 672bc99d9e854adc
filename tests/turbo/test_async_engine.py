"""AsyncEngine: streams equal to offline generation, abort and consumer cancellation free blocks,
bad input, a dying engine loop and shutdown end every stream cleanly."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.async_engine import AsyncEngine
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.llm import LLM
from lmcompress.turbo.outputs import RequestOutput
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason

DEVICE = os.environ.get("LMC_TEST_DEVICE", "cpu")
OPTIONS = dict(device=DEVICE, block_size=16, num_kv_blocks=64, max_model_len=512)
GREEDY = SamplingParams(temperature=0, max_tokens=16)
LONG = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
PROMPTS = ["The king said", "In the beginning", [0, 17, 42, 99], "Grub, n.", "And the LORD spake unto Moses", "x"]
TIMEOUT_S = 60


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def engine():
    engine = AsyncEngine(EngineConfig(model=REFERENCE_MODEL_DIR, **OPTIONS))
    yield engine
    engine.shutdown()


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, TIMEOUT_S))


async def collect(engine: AsyncEngine, prompt, params: SamplingParams, request_id: str) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params, request_id)]


async def until(condition, what: str) -> None:
    """Wait (polling) for a condition the engine thread brings about."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_concurrent_streams_equal_offline_generate(engine):
    async def staggered():
        tasks = []
        for i, prompt in enumerate(PROMPTS):
            tasks.append(asyncio.create_task(collect(engine, prompt, GREEDY, f"req-{i}")))
            await asyncio.sleep(0.02 * (i % 3))  # arrivals land between engine steps
        return await asyncio.gather(*tasks)

    streams = run(staggered())
    offline = LLM(REFERENCE_MODEL_DIR, **OPTIONS).generate(PROMPTS, GREEDY)
    for i, (stream, expected) in enumerate(zip(streams, offline)):
        assert [out.finished for out in stream] == [False] * (len(stream) - 1) + [True]
        assert {out.request_id for out in stream} == {f"req-{i}"}
        (choice,) = expected.outputs
        assert tuple(t for out in stream for t in out.outputs[0].token_ids) == choice.token_ids
        assert "".join(out.outputs[0].text for out in stream) == choice.text
        assert stream[-1].outputs[0].finish_reason is choice.finish_reason
        assert stream[-1].usage == expected.usage
    stats = engine.stats()
    assert stats.generation_tokens == sum(len(out.outputs[0].token_ids) for out in offline)
    assert stats.prompt_tokens == sum(out.usage.prompt_tokens for out in offline)
    assert stats.num_free_blocks == stats.num_total_blocks and engine.is_alive


def test_leaving_a_stream_early_aborts_the_request(engine):
    async def leave_after_two_outputs():
        stream = engine.generate("The king said", LONG, "left")
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 2:
                assert engine.stats().num_running == 1
                break
        await stream.aclose()
        await until(lambda: engine.stats().num_running == 0, "the abort")

    async def cancel_the_consumer():
        task = asyncio.create_task(collect(engine, "In the beginning", LONG, "cancelled"))
        await until(lambda: engine.stats().num_running == 1, "the request to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: engine.stats().num_running == 0, "the abort")

    run(leave_after_two_outputs())
    run(cancel_the_consumer())
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    assert stats.generation_tokens < LONG.max_tokens  # neither request ran to its end


def test_abort_frees_blocks_before_returning_and_ends_the_stream(engine):
    async def scenario():
        task = asyncio.create_task(collect(engine, "The king said", LONG, "victim"))
        await until(lambda: engine.stats().num_running == 1, "the request to start")
        assert engine.stats().num_free_blocks < engine.stats().num_total_blocks
        assert await engine.abort("victim")
        stats = engine.stats()
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0
        outputs = await task
        assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason is FinishReason.ABORT
        assert not await engine.abort("victim")

    run(scenario())


def test_bad_input(engine):
    async def scenario():
        with pytest.raises(LmcError, match="token ids must be integers"):
            await collect(engine, [5, -1], GREEDY, "bad-ids")
        task = asyncio.create_task(collect(engine, "The king said", LONG, "dup"))
        await until(lambda: engine.stats().num_running == 1, "the first request")
        with pytest.raises(LmcError, match="'dup' is already in flight"):
            await collect(engine, "other", GREEDY, "dup")
        await engine.abort("dup")
        await task
        (error,) = await collect(engine, list(range(5, 600)), GREEDY, "too-long")
        assert error.finished and error.outputs[0].finish_reason is FinishReason.ERROR
        assert "max_model_len is 512" in error.outputs[0].error

    run(scenario())
    assert engine.is_alive


def test_a_dying_engine_loop_ends_every_stream(engine, monkeypatch):
    def broken_step():
        raise RuntimeError("scheduler invariant broken")

    async def scenario():
        monkeypatch.setattr(engine.engine, "step", broken_step)
        with pytest.raises(LmcError, match="engine loop died: RuntimeError: scheduler invariant broken"):
            await collect(engine, "The king said", GREEDY, "first")
        await until(lambda: not engine.is_alive, "the loop to stop")
        with pytest.raises(LmcError, match="not running"):
            await collect(engine, "The king said", GREEDY, "after")
        with pytest.raises(LmcError, match="not running"):
            await engine.abort("after")

    run(scenario())


def test_shutdown_ends_streams_in_flight(engine):
    async def scenario():
        task = asyncio.create_task(collect(engine, "The king said", LONG, "in-flight"))
        await until(lambda: engine.stats().num_running == 1, "the request to start")
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(LmcError, match="shut down"):
            await task

    run(scenario())
    assert not engine.is_alive
    engine.shutdown()  # idempotent
