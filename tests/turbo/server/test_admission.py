"""AdmissionQueue: slots by weight, FIFO order, a bounded queue, and cancellation that leaks nothing."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lmcompress.turbo.server.admission import AdmissionQueue, QueueFull


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 5))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_free_slots_admit_at_once_and_the_rest_wait_in_order():
    async def scenario():
        queue = AdmissionQueue(slots=4, max_waiting=10)
        assert await queue.admit(3) == 0.0
        order = []

        async def wait(name, weight):
            await queue.admit(weight)
            order.append(name)

        tasks = [asyncio.create_task(wait(name, weight)) for name, weight in (("a", 2), ("b", 1), ("c", 1))]
        await settle()
        # b alone would fit (3 + 1 <= 4), but a came first and needs 2: FIFO keeps b behind a.
        assert order == [] and queue.num_waiting == 3
        queue.release(3)
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"] and queue.num_admitted == 4

    run(scenario())


def test_full_queue_refuses_at_once():
    async def scenario():
        queue = AdmissionQueue(slots=1, max_waiting=1)
        await queue.admit(1)
        waiting = asyncio.create_task(queue.admit(1))
        await settle()
        with pytest.raises(QueueFull):
            await queue.admit(1)
        queue.release(1)
        assert await waiting >= 0.0

    run(scenario())


def test_cancelled_waiter_leaves_the_queue_and_lets_the_next_in():
    async def scenario():
        queue = AdmissionQueue(slots=2, max_waiting=5)
        await queue.admit(1)
        heavy = asyncio.create_task(queue.admit(2))
        light = asyncio.create_task(queue.admit(1))
        await settle()
        assert queue.num_waiting == 2
        heavy.cancel()
        await settle()
        assert light.done() and queue.num_waiting == 0 and queue.num_admitted == 2

    run(scenario())


def test_weight_beyond_the_slots_is_a_caller_bug():
    async def scenario():
        with pytest.raises(ValueError):
            await AdmissionQueue(slots=2, max_waiting=1).admit(3)

    run(scenario())


@settings(max_examples=60, deadline=None)
@given(slots=st.integers(1, 4), weights=st.lists(st.integers(1, 4), min_size=1, max_size=12),
       cancel=st.lists(st.booleans(), min_size=12, max_size=12))
# A waiter cancelled at the head of the queue while a holder releases (once a hang).
@example(slots=2, weights=[1, 1, 1, 2], cancel=[False, False, True] + [False] * 9)
def test_slots_never_overflow_and_all_return(slots, weights, cancel):
    async def scenario():
        queue = AdmissionQueue(slots=slots, max_waiting=len(weights))
        peak = 0

        async def job(weight):
            nonlocal peak
            await queue.admit(weight)
            try:  # a holder cancelled while it holds gives its slots back (as Generation's pumps do)
                peak = max(peak, queue.num_admitted)
                await asyncio.sleep(0)
            finally:
                queue.release(weight)

        tasks = [asyncio.create_task(job(min(w, slots))) for w in weights]
        await asyncio.sleep(0)
        for task, drop in zip(tasks, cancel):
            if drop:
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert peak <= slots
        assert queue.num_admitted == 0 and queue.num_waiting == 0

    run(scenario())
