"""AsyncEngine: an LLMEngine stepping in one background thread, served to asyncio code.

The scheduler is not thread-safe, so only the engine thread touches the engine.
Callers send commands (add, abort, stop) through a thread-safe queue that the
thread drains at the start of every step, or waits on while it has no work.
Outputs travel back to each request's asyncio.Queue with call_soon_threadsafe.

    engine = AsyncEngine(EngineConfig(model="path"))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=16), "req-1"):
        print(out.outputs[0].text, end="")

Closing the stream early aborts the request and frees its KV blocks: task
cancellation does so at once; after a `break`, call the generator's aclose() (or
iterate inside contextlib.aclosing), else it happens when the generator is
garbage-collected.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lmcompress.errors import LmcError
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import LLMEngine, Prompt
from lmcompress.turbo.outputs import EngineStats, RequestOutput
from lmcompress.turbo.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long shutdown() waits for the step in progress to end.
_SHUTDOWN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class _Reply:
    """A future of some event loop, resolved from the engine thread."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def send(self, result: object = None, error: BaseException | None = None) -> bool:
        """Resolve the future (unless cancelled meanwhile); False when its event loop is closed."""
        def resolve() -> None:
            if self.future.done():
                return
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)

        return _call_in_loop(self.loop, resolve)


@dataclass(frozen=True)
class _Stream:
    """Where one request's outputs go: an asyncio.Queue of RequestOutput, or an exception that ends it."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> bool:
        return _call_in_loop(self.loop, lambda: self.outputs.put_nowait(item))


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: Prompt
    params: SamplingParams | None
    stream: _Stream
    reply: _Reply
    stream_text: bool


@dataclass(frozen=True)
class _Abort:
    request_id: str
    reply: _Reply | None


class _Stop:
    """Ends the engine loop."""


def _call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> bool:
    try:
        loop.call_soon_threadsafe(callback)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        return False
    return True


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        # Loading happens here, in the caller's thread: a bad checkpoint raises LmcError at once.
        self.engine = LLMEngine(config)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stats = self.engine.stats()
        self._death: str | None = None  # why the loop stopped, once it has
        # Orders _post against the loop's end, so no command is queued after the final drain.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="turbo-engine", daemon=True)
        self._thread.start()

    # --- asyncio side ---------------------------------------------------------------------------

    @property
    def is_alive(self) -> bool:
        """False once the engine thread has stopped (shutdown, or an error that broke the engine)."""
        return self._thread.is_alive() and self._death is None

    @property
    def kv_capacity_tokens(self) -> int:
        return self.engine.kv_capacity_tokens

    def stats(self) -> EngineStats:
        """The snapshot taken after the engine thread's latest step."""
        return self._stats

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, stream_text: bool = True) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs (deltas) until one has finished=True.

        stream_text=False: the deltas carry token ids only and the last one all the text (decoded once; see
        LLMEngine.add_request), for callers that read the text at the end.

        Bad input (duplicate request id, invalid token ids) raises LmcError before
        the first output; a prompt that cannot be served yields one error output.
        """
        request_id = request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        stream, added = _Stream(loop, asyncio.Queue()), loop.create_future()
        finished = False
        self._send(_Add(request_id, prompt, params, stream, _Reply(loop, added), stream_text))
        try:
            await added
            while not finished:
                item = await stream.outputs.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                # The consumer left early: free the request's blocks.  Commands run in
                # order, so this abort follows the add even if the add is still queued.
                self._post(_Abort(request_id, None))

    async def abort(self, request_id: str) -> bool:
        """Abort a request; returns once its blocks are free.  False if it was unknown or done."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._send(_Abort(request_id, _Reply(loop, done)))
        return await done

    def shutdown(self) -> None:
        """Stop the engine thread; requests still in flight end with an LmcError.  Idempotent."""
        self._post(_Stop())
        self._thread.join(_SHUTDOWN_TIMEOUT_S)

    def _send(self, command: _Add | _Abort) -> None:
        if not self._post(command):
            raise LmcError(f"the turbo engine is not running ({self._death}); restart it")

    def _post(self, command: _Add | _Abort | _Stop) -> bool:
        """Queue a command for the engine thread; False once the thread has stopped taking them."""
        with self._lock:
            if self._death is not None:
                return False
            self._commands.put(command)
            return True

    # --- engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            while self._run_commands(wait=not self.engine.has_unfinished()):
                if self.engine.has_unfinished():
                    self._deliver(self.engine.step())
                self._stats = self.engine.stats()
        except Exception as exc:  # the engine is broken: tell every waiting client
            logger.exception("turbo: the engine loop died")
            reason = f"the engine loop died: {type(exc).__name__}: {exc}"
        else:
            reason = "shut down"
        with self._lock:
            self._death = reason
        self._end_requests(LmcError(f"the turbo engine stopped ({reason}); retry on a running engine"))

    def _run_commands(self, wait: bool) -> bool:
        """Apply the queued commands, first waiting for one if `wait`; False on _Stop."""
        try:
            command = self._commands.get(block=wait)
            while True:
                if isinstance(command, _Stop):
                    return False
                self._apply(command)
                command = self._commands.get_nowait()
        except queue.Empty:
            return True

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            found = self.engine.abort(command.request_id)
            self._stats = self.engine.stats()  # the freed blocks show as soon as abort() returns
            if command.reply is not None:
                command.reply.send(found)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params, command.stream_text)
        except LmcError as exc:
            command.reply.send(error=exc)
            return
        self._streams[command.request_id] = command.stream
        if not command.reply.send():
            self.engine.abort(command.request_id)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            if not stream.put(out):
                self.engine.abort(out.request_id)

    def _end_requests(self, error: LmcError) -> None:
        """Answer every stream and every command still queued with `error`."""
        for stream in self._streams.values():
            stream.put(error)
        self._streams.clear()
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add):
                command.reply.send(error=error)
            elif isinstance(command, _Abort) and command.reply is not None:
                command.reply.send(False)
