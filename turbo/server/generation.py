"""The engine side of one HTTP request: its engine requests, merged into one stream.

A completions request may carry several prompts; each becomes one engine request
(with the request's n choices), and their outputs interleave as the engine makes
progress.  Pump tasks move each engine stream into one queue, so the engine work
runs and ends (releasing its admission slots) even if nobody reads the queue, and
closing the merged stream cancels the pumps, which aborts their engine requests.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from starlette.requests import Request

from lmcompress.turbo.async_engine import AsyncEngine
from lmcompress.turbo.outputs import RequestOutput, Usage
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.server.metrics import RequestTimer
from lmcompress.turbo.server.protocol import PromptTokensDetails, UsageInfo

T = TypeVar("T")
_DONE = object()  # a pump's end marker in the merged queue


class ClientGone(Exception):
    """The client disconnected before the work it asked for was done."""


class Generation:
    """Engine requests `{request_id}-{i}` for prompts i = 0, 1, ..., each with `params.n` choices.

    release(n) is called once per prompt when its engine request ends (finished,
    failed or aborted): the admission slots it held are free again.
    """

    def __init__(self, engine: AsyncEngine, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 request_id: str, timer: RequestTimer, release: Callable[[int], None], stream_text: bool = True):
        self.request_id = request_id
        self._engine, self._params, self._timer, self._stream_text = engine, params, timer, stream_text
        self._queue: asyncio.Queue = asyncio.Queue()
        self._usage: dict[int, Usage] = {}
        self._tasks = [asyncio.create_task(self._pump(i, prompt)) for i, prompt in enumerate(prompts)]
        for task in self._tasks:
            # A done callback, not a `finally`: a task cancelled before its first step never runs its body.
            task.add_done_callback(lambda _: release(params.n))

    async def _pump(self, index: int, prompt: Sequence[int]) -> None:
        try:
            request_id = f"{self.request_id}-{index}"
            async for out in self._engine.generate(prompt, self._params, request_id, stream_text=self._stream_text):
                self._queue.put_nowait((index, out))
            self._queue.put_nowait((index, _DONE))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which answers with an error
            self._queue.put_nowait((index, exc))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output delta) as the engine produces them; raises the first engine error.

        Leaving early (break, cancellation, a closed stream) aborts every engine request.
        """
        running = len(self._tasks)
        try:
            while running:
                index, item = await self._queue.get()
                if item is _DONE:
                    running -= 1
                    continue
                if isinstance(item, Exception):
                    raise item
                self._usage[index] = item.usage
                if any(choice.token_ids for choice in item.outputs):
                    self._timer.tokens_arrived()
                yield index, item
            self._timer.finished()
        finally:
            self.close()

    def close(self) -> None:
        """Abort whatever still runs (a no-op once every engine request has ended)."""
        for task in self._tasks:
            task.cancel()

    async def collect(self) -> dict[int, RequestOutput]:
        """Every prompt's whole output (all choices), by prompt index."""
        merged: dict[int, RequestOutput] = {}
        async for index, out in self.outputs():
            merged[index] = merged[index].extended(out) if index in merged else out
        return merged

    def usage(self) -> UsageInfo:
        """Token counts summed over the prompts, as of the latest outputs."""
        prompt = sum(u.prompt_tokens for u in self._usage.values())
        completion = sum(u.completion_tokens for u in self._usage.values())
        cached = sum(u.cached_tokens for u in self._usage.values())
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


async def until_disconnect(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; if the client disconnects first, cancel it and raise ClientGone.

    For work done before the response starts (queueing, a non-streamed answer):
    Starlette notices a disconnect only while it streams a response body.
    """
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work_task.done():
            work_task.cancel()
        await asyncio.gather(work_task, watcher, return_exceptions=True)  # let their cleanup run
    if work_task.cancelled():
        raise ClientGone
    return work_task.result()


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next message the server sends is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
