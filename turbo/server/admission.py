"""Admission control: at most `slots` sequences in the engine, a bounded FIFO queue for the rest.

The engine runs at most max_num_seqs sequences at once, so the server hands it
no more than that and keeps later requests in its own queue.  That queue is
where request_queue_time_seconds is measured, and its bound is what turns a
flood into fast 429 answers instead of an ever-growing backlog.  A request
asking for n completions of p prompts weighs n * p slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass, field


class QueueFull(Exception):
    """The queue holds max_waiting requests already."""


@dataclass(eq=False)
class _Waiter:
    weight: int
    admitted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class AdmissionQueue:
    def __init__(self, slots: int, max_waiting: int):
        self.slots = slots
        self.max_waiting = max_waiting
        self._in_use = 0
        self._waiters: deque[_Waiter] = deque()

    @property
    def num_waiting(self) -> int:
        return len(self._waiters)

    @property
    def num_admitted(self) -> int:
        """Slots held by admitted requests."""
        return self._in_use

    async def admit(self, weight: int) -> float:
        """Wait (FIFO) until `weight` slots are free and take them; returns the seconds waited.

        Raises QueueFull at once when max_waiting requests wait already, ValueError
        for a weight no free engine could ever hold.  Cancelled while waiting: leaves
        the queue holding nothing.
        """
        if not 1 <= weight <= self.slots:
            raise ValueError(f"weight {weight} is outside [1, {self.slots}]")
        start = time.perf_counter()
        if not self._waiters and self._in_use + weight <= self.slots:
            self._in_use += weight
            return 0.0
        if len(self._waiters) >= self.max_waiting:
            raise QueueFull
        waiter = _Waiter(weight)
        self._waiters.append(waiter)
        try:
            await waiter.admitted
        except asyncio.CancelledError:
            if waiter.admitted.done() and not waiter.admitted.cancelled():
                self.release(weight)  # admitted in the same instant: give the slots back
            else:
                waiter.admitted.cancel()
                with contextlib.suppress(ValueError):  # _wake may have dropped it already
                    self._waiters.remove(waiter)
                self._wake()  # a heavy head leaving may let lighter requests behind it in
            raise
        return time.perf_counter() - start

    def release(self, weight: int) -> None:
        self._in_use -= weight
        self._wake()

    def _wake(self) -> None:
        """Admit waiters from the head while they fit; FIFO, so a heavy head blocks the ones behind."""
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.admitted.cancelled():  # its task was cancelled and has not run its cleanup yet
                self._waiters.popleft()
                continue
            if self._in_use + waiter.weight > self.slots:
                return
            self._waiters.popleft()
            self._in_use += waiter.weight
            waiter.admitted.set_result(None)
