"""Persistent-batching scheduler with vLLM V1's single rule.

There are no prefill and decode phases.  Each step spends a token budget
(max_num_batched_tokens) letting every request's num_computed_tokens catch up
with its num_tokens: running requests first, in admission order (a decode needs
1 token, a request still prefilling gets its next chunk), then waiting requests
in FIFO order.  When the KV pool runs dry the newest running request is
preempted: its blocks are freed and it is recomputed later from the front of the
waiting queue.

The scheduler owns capacity limits (KV pool, max_model_len, max_num_seqs); the
engine owns stop conditions (eos, stop strings, max_tokens) and reports them
through finish().
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from lmcompress.errors import LmcError
from lmcompress.turbo.block_manager import BlockManager, CachedPrefix
from lmcompress.turbo.config import CacheConfig, SchedulerConfig
from lmcompress.turbo.sequence import PENDING, FinishReason, Sequence, SequenceStatus


# Built per sequence per step: slotted and unfrozen, a quarter of a frozen dataclass's construction time.
@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's share of a forward pass: tokens [start, start + num_new_tokens)."""

    seq: Sequence
    start: int  # seq.num_computed_tokens when scheduled; the chunk's first position
    num_new_tokens: int
    # The chunk ends at the sequence's last token, so the engine must sample one
    # token from its last logits; other chunks (mid-prompt, or mid-recompute after
    # a preemption) sample nothing.
    samples: bool

    def token_ids(self) -> tuple[int, ...]:
        return self.seq.token_slice(self.start, self.start + self.num_new_tokens)


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq]  # batch rows of this step, running requests first
    preempted: list[Sequence]  # lost their KV this step; will be recomputed
    # Every sequence finished since the previous schedule(), whatever the cause
    # (rejected at add, aborted, engine stop, length, error), each exactly once:
    # the engine and model runner drop per-request state here.
    finished: list[Sequence]

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, cache: CacheConfig):
        self.config = config
        self.block_manager = BlockManager(cache.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: newest last
        self.num_preemptions = 0
        self._unfinished: dict[str, Sequence] = {}
        self._finished_since_schedule: list[Sequence] = []
        self._num_arrivals = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        """True while a request is waiting or running, or a finished one awaits report by schedule()."""
        return bool(self.waiting or self.running or self._finished_since_schedule)

    def add(self, seq: Sequence) -> bool:
        """Queue a new request; returns False when it can never be served.

        A rejected sequence is finished at once with FinishReason.ERROR and the
        reason in seq.error_message; other requests are unaffected.
        """
        if seq.request_id in self._unfinished:
            raise LmcError(f"request id {seq.request_id!r} is already in flight; give every request a unique id")
        seq.arrival_index = self._num_arrivals
        self._num_arrivals += 1
        problem = self._rejection(seq)
        if problem:
            self._mark_finished(seq, FinishReason.ERROR, problem)
            return False
        self._unfinished[seq.request_id] = seq
        self.waiting.append(seq)
        return True

    def abort(self, request_id: str) -> bool:
        """Finish an unfinished request as aborted and free its blocks now; False if unknown or done."""
        seq = self._unfinished.get(request_id)
        if seq is None:
            return False
        self.finish(seq, FinishReason.ABORT)
        return True

    def finish(self, seq: Sequence, reason: FinishReason, error_message: str | None = None) -> None:
        """Finish `seq` wherever it is (waiting or running) and free its blocks; no-op if already finished."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        if seq.has_pending_token:  # sampled by a pass still in flight, for a sequence that ends first: dropped
            seq.output_token_ids.pop()
        del self._unfinished[seq.request_id]
        self._mark_finished(seq, reason, error_message)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        # Admitting new work right after preempting would only thrash the pool.
        if not preempted:
            self._schedule_waiting(budget, scheduled)
        finished, self._finished_since_schedule = self._finished_since_schedule, []
        return SchedulerOutput(scheduled, preempted, finished)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int]) -> list[Sequence]:
        """Record a finished forward pass at once: advance() then resolve()."""
        self.advance(output)
        return self.resolve(output, sampled_token_ids)

    def advance(self, output: SchedulerOutput) -> None:
        """Record a forward pass as launched: its tokens' K/V count as computed, and every sequence that
        samples gets a PENDING output token, so the next schedule() can already give it its decode row."""
        for item in output.scheduled:
            seq = item.seq
            if seq.is_finished:  # failed or aborted before the launch was recorded
                continue
            seq.num_computed_tokens = item.start + item.num_new_tokens
            if item.samples:
                seq.output_token_ids.append(PENDING)

    def resolve(self, output: SchedulerOutput, sampled_token_ids: Mapping[str, int]) -> list[Sequence]:
        """Fill in the tokens an advanced pass sampled; returns the sequences that received one.

        `sampled_token_ids` maps request id to the token sampled for every ScheduledSeq
        with samples=True; other entries are ignored.  The engine checks its stop
        conditions on the returned sequences and calls finish(); a returned sequence
        may already be finished with LENGTH (max_model_len).  Sequences finished since
        advance() (aborted, or stopped by their previous token) are skipped.
        """
        updated: list[Sequence] = []
        for item in output.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            if item.samples:
                position = item.start + item.num_new_tokens  # of the sampled token in prompt + outputs
                seq.output_token_ids[position - seq.num_prompt_tokens] = self._sampled_token(sampled_token_ids, seq)
            self.block_manager.cache_full_blocks(seq)  # every computed token is known now
            if item.samples:
                if position + 1 >= self.config.max_model_len:
                    self.finish(seq, FinishReason.LENGTH)
                updated.append(seq)
        return updated

    def _schedule_running(self, budget: int, scheduled: list[ScheduledSeq], preempted: list[Sequence]) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if self._has_every_token(seq):  # its last token is still being sampled; it finishes on arrival
                index += 1
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, preempted):
                break  # seq itself is gone, and it was the newest: nothing left to schedule
            scheduled.append(self._chunk(seq, num_new))
            budget -= num_new
            index += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, preempted: list[Sequence]) -> bool:
        """Allocate seq's chunk, preempting the newest running requests until it fits.

        Returns False when seq itself had to go (preempted, or failed because it
        does not fit even alone).  Requests scheduled earlier in this step are
        older than seq, so they are never the victims.
        """
        while not self.block_manager.allocate_slots(seq, num_new):
            if len(self.running) == 1:  # alone with the whole pool and still short
                self.finish(seq, FinishReason.ERROR, self._too_long_message(seq, seq.num_computed_tokens + num_new))
                return False
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, budget: int, scheduled: list[ScheduledSeq]) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.block_manager.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - prefix.num_tokens, budget)
            if not self.block_manager.allocate_slots(seq, num_new, prefix):
                # Strict FIFO: wait for running requests to free blocks.  This cannot
                # deadlock: once nothing runs the whole pool is free, and every waiting
                # request fits it.  add() checks prompts; a request only grows past the
                # pool by computing a whole pool of KV, i.e. holding every block, so
                # nothing older runs beside it and it fails alone instead of being
                # preempted (an older request always holds a block of its own).
                break
            self.waiting.popleft()
            self._admit(seq, prefix)
            scheduled.append(self._chunk(seq, num_new))
            budget -= num_new

    def _admit(self, seq: Sequence, prefix: CachedPrefix) -> None:
        seq.num_computed_tokens = prefix.num_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = prefix.num_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Front of the queue: victims go newest first, so older ones end up ahead.
        self.waiting.appendleft(seq)

    def _has_every_token(self, seq: Sequence) -> bool:
        """seq holds its last allowed token (max_output_tokens or max_model_len), which needs no K/V."""
        limit = seq.max_output_tokens
        return seq.num_tokens >= self.config.max_model_len or (limit is not None and seq.num_output_tokens >= limit)

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        return ScheduledSeq(seq, start, num_new, samples=start + num_new == seq.num_tokens)

    def _mark_finished(self, seq: Sequence, reason: FinishReason, error_message: str | None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error_message = error_message
        self._finished_since_schedule.append(seq)

    def _rejection(self, seq: Sequence) -> str | None:
        """Why `seq` can never be served, or None."""
        num_prompt, max_len = seq.num_prompt_tokens, self.config.max_model_len
        if num_prompt == 0:
            return f"request {seq.request_id!r} has an empty prompt; send at least one token"
        if num_prompt >= max_len:
            return (
                f"request {seq.request_id!r} has a {num_prompt}-token prompt but max_model_len is {max_len}, "
                f"leaving no room for output; shorten the prompt below {max_len} tokens"
            )
        if self.block_manager.blocks_for(num_prompt) > self.block_manager.num_blocks:
            return self._too_long_message(seq, num_prompt)
        return None

    def _too_long_message(self, seq: Sequence, num_tokens: int) -> str:
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        return (
            f"request {seq.request_id!r} needs KV for {num_tokens} tokens but the whole cache holds "
            f"{capacity}; shorten the request or give the KV cache more blocks"
        )

    @staticmethod
    def _sampled_token(sampled_token_ids: Mapping[str, int], seq: Sequence) -> int:
        token = sampled_token_ids.get(seq.request_id)
        if token is None:
            raise LmcError(
                f"no sampled token for request {seq.request_id!r}, which reached its last token this step; "
                f"return one token for every ScheduledSeq with samples=True"
            )
        return token
