from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lmcompress.errors import LmcError
from lmcompress.turbo.config import CacheConfig, SchedulerConfig
from lmcompress.turbo.scheduler import Scheduler, SchedulerOutput
from lmcompress.turbo.sequence import PENDING, FinishReason, Sequence, SequenceStatus


def make_scheduler(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    budget: int = 64,
    max_model_len: int = 256,
    prefix_caching: bool = True,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix_caching),
    )


def step(scheduler: Scheduler, token: int = 0) -> SchedulerOutput:
    """One engine step with a fake model that samples `token` for every sequence that needs one."""
    out = scheduler.schedule()
    scheduler.update_from_output(out, {item.seq.request_id: token for item in out.scheduled if item.samples})
    return out


def rows(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(item.seq.request_id, item.num_new_tokens) for item in out.scheduled]


def add(scheduler: Scheduler, request_id: str, num_prompt: int, first_token: int = 100) -> Sequence:
    seq = Sequence(request_id, range(first_token, first_token + num_prompt))
    assert scheduler.add(seq)
    return seq


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: CacheConfig(num_blocks=0), "num_blocks"),
        (lambda: CacheConfig(num_blocks=4, block_size=-64), "block_size"),
        (lambda: CacheConfig(num_blocks=True), "num_blocks"),
        (lambda: CacheConfig(num_blocks=4, enable_prefix_caching="yes"), "enable_prefix_caching"),
        (lambda: SchedulerConfig(max_model_len=0), "max_model_len"),
        (lambda: SchedulerConfig(max_model_len=1), "max_model_len"),
        (lambda: SchedulerConfig(max_model_len=64, max_num_seqs=0), "max_num_seqs"),
        (lambda: SchedulerConfig(max_model_len=64, max_num_batched_tokens=2.5), "max_num_batched_tokens"),
    ],
)
def test_bad_config_names_the_field(build, field):
    with pytest.raises(LmcError, match=field):
        build()


def test_config_defaults_match_turbomind_and_vllm():
    cache, sched = CacheConfig(num_blocks=10), SchedulerConfig(max_model_len=4096)
    assert (cache.block_size, cache.enable_prefix_caching) == (64, True)
    assert (sched.max_num_seqs, sched.max_num_batched_tokens) == (256, 8192)


# --- the token budget ------------------------------------------------------------------------


def test_long_prompt_is_chunked_across_steps_and_samples_once():
    scheduler = make_scheduler(budget=8)
    seq = add(scheduler, "a", 20)
    chunks = [step(scheduler).scheduled[0] for _ in range(3)]
    assert [(c.start, c.num_new_tokens, c.samples) for c in chunks] == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert chunks[1].token_ids() == tuple(range(108, 116))
    assert seq.output_token_ids == [0] and seq.num_computed_tokens == 20
    assert rows(step(scheduler)) == [("a", 1)]  # then decode, one token a step


def test_running_requests_are_served_before_waiting_ones():
    scheduler = make_scheduler(budget=5)
    add(scheduler, "a", 3)
    step(scheduler)
    add(scheduler, "b", 10)
    assert rows(step(scheduler)) == [("a", 1), ("b", 4)]
    assert rows(step(scheduler)) == [("a", 1), ("b", 4)]


def test_a_prefilling_running_request_gets_the_next_chunk_first():
    scheduler = make_scheduler(budget=6)
    add(scheduler, "a", 10)
    step(scheduler)
    add(scheduler, "b", 2)
    assert rows(step(scheduler)) == [("a", 4), ("b", 2)]


def test_waiting_requests_are_admitted_in_fifo_order():
    scheduler = make_scheduler(budget=100)
    for name in "abc":
        add(scheduler, name, 5)
    assert rows(step(scheduler)) == [("a", 5), ("b", 5), ("c", 5)]
    assert [s.arrival_index for s in scheduler.running] == [0, 1, 2]


def test_fifo_does_not_let_a_small_request_jump_a_blocked_one():
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    add(scheduler, "running", 8)  # holds 2 of the 4 blocks
    step(scheduler)
    add(scheduler, "big", 12, first_token=500)  # needs 3 blocks: must wait
    add(scheduler, "small", 2, first_token=900)  # would fit, but arrived later
    assert rows(step(scheduler)) == [("running", 1)]
    assert [s.request_id for s in scheduler.waiting] == ["big", "small"]


def test_max_num_seqs_caps_the_running_set():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        add(scheduler, name, 3)
    assert rows(step(scheduler)) == [("a", 3), ("b", 3)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)


# --- preemption ------------------------------------------------------------------------------


def test_out_of_blocks_preempts_the_newest_running_request():
    scheduler = make_scheduler(num_blocks=4, block_size=2, prefix_caching=False)
    a, b, c = add(scheduler, "a", 4), add(scheduler, "b", 1), add(scheduler, "c", 1)
    step(scheduler)  # the pool is full; only a's decode needs another block
    out = step(scheduler)
    assert out.preempted == [c] and rows(out) == [("a", 1), ("b", 1)]
    assert c.status is SequenceStatus.PREEMPTED and c.block_table == []
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1
    assert scheduler.waiting[0] is c and scheduler.num_preemptions == 1
    assert len(a.block_table) == 3 and not b.is_finished


def test_several_victims_queue_oldest_first_and_block_new_admissions():
    scheduler = make_scheduler(num_blocks=4, block_size=2, prefix_caching=False)
    seqs = [add(scheduler, name, 2, first_token=10 * i) for i, name in enumerate("abcd")]
    step(scheduler)
    add(scheduler, "late", 1)
    out = step(scheduler)
    # a and b each need a 2nd block; d then c are preempted to provide them.
    assert out.preempted == [seqs[3], seqs[2]] and rows(out) == [("a", 1), ("b", 1)]
    assert [s.request_id for s in scheduler.waiting] == ["c", "d", "late"]


def test_a_step_that_preempts_admits_nothing_new():
    scheduler = make_scheduler(num_blocks=3, block_size=2, budget=3, prefix_caching=False)
    a = add(scheduler, "a", 2)
    step(scheduler)
    b = add(scheduler, "b", 2)
    step(scheduler)  # a: 2 blocks, b: 1 block, pool full
    out = step(scheduler)  # b's decode needs a block: b, the newest, preempts itself
    # b's first recompute chunk (2 tokens, 1 block) would fit now, but re-admitting it would thrash.
    assert out.preempted == [b] and rows(out) == [("a", 1)]
    assert list(scheduler.waiting) == [b] and scheduler.block_manager.num_free_blocks == 1
    assert not a.is_finished


def test_preempted_request_recomputes_prompt_and_outputs_then_continues():
    scheduler = make_scheduler(num_blocks=3, block_size=2, prefix_caching=False)
    a, b = add(scheduler, "a", 3, first_token=10), add(scheduler, "b", 2, first_token=20)
    step(scheduler, token=7)  # a: 2 blocks, b: 1 block; both sampled 7
    out = step(scheduler, token=8)  # b needs a 2nd block: it is the newest, so it preempts itself
    assert out.preempted == [b] and rows(out) == [("a", 1)]
    scheduler.finish(a, FinishReason.STOP)
    out = step(scheduler, token=9)
    assert rows(out) == [("b", 3)] and out.scheduled[0].token_ids() == (20, 21, 7)
    assert b.output_token_ids == [7, 9]


def test_request_too_long_for_the_whole_pool_fails_alone():
    scheduler = make_scheduler(num_blocks=2, block_size=2, prefix_caching=False)
    a = add(scheduler, "a", 3)
    for _ in range(3):
        step(scheduler)  # 3 prompt tokens + 2 outputs: the 5th token's KV has no room
    assert a.finish_reason is FinishReason.ERROR and "holds 4" in a.error_message
    assert a.block_table == [] and scheduler.block_manager.num_free_blocks == 2
    b = add(scheduler, "b", 1)
    step(scheduler)
    assert not b.is_finished and b.output_token_ids == [0]


# --- admission checks, abort, finish -------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, message",
    [([], "empty prompt"), (range(16), "max_model_len is 16"), (range(15), "holds 12")],
)
def test_unservable_request_is_rejected_alone(prompt, message):
    scheduler = make_scheduler(num_blocks=3, block_size=4, max_model_len=16)
    ok = add(scheduler, "ok", 2)
    bad = Sequence("bad", prompt)
    assert not scheduler.add(bad)
    assert bad.finish_reason is FinishReason.ERROR and message in bad.error_message
    out = step(scheduler)
    assert out.finished == [bad] and rows(out) == [("ok", 2)] and not ok.is_finished


def test_duplicate_request_id_is_refused():
    scheduler = make_scheduler()
    add(scheduler, "a", 2)
    with pytest.raises(LmcError, match="unique id"):
        scheduler.add(Sequence("a", [1]))


def test_abort_frees_blocks_at_once_wherever_the_request_is():
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    running, waiting = add(scheduler, "run", 10), add(scheduler, "wait", 3)
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 5
    assert scheduler.abort("run") and scheduler.abort("wait")
    assert scheduler.block_manager.num_free_blocks == 8
    assert (scheduler.num_running, scheduler.num_waiting) == (0, 0)
    assert running.finish_reason is waiting.finish_reason is FinishReason.ABORT
    assert not scheduler.abort("run") and not scheduler.abort("never-seen")
    assert scheduler.has_unfinished()  # until schedule() reports them
    assert step(scheduler).finished == [running, waiting]
    assert not scheduler.has_unfinished()


def test_abort_between_schedule_and_update_is_skipped():
    scheduler = make_scheduler()
    seq = add(scheduler, "a", 4)
    out = scheduler.schedule()
    scheduler.abort("a")
    assert scheduler.update_from_output(out, {"a": 5}) == []
    assert seq.output_token_ids == []


def test_update_returns_sequences_with_a_new_token_and_engine_finishes_them():
    scheduler = make_scheduler(budget=4)
    short, long = add(scheduler, "short", 2), add(scheduler, "long", 6)
    out = scheduler.schedule()
    assert scheduler.update_from_output(out, {"short": 1, "long": 99}) == [short]  # long is mid-prompt
    assert long.output_token_ids == []
    scheduler.finish(short, FinishReason.STOP)
    assert short.block_table == [] and short.finish_reason is FinishReason.STOP
    scheduler.finish(short, FinishReason.ABORT)  # already finished: ignored
    assert short.finish_reason is FinishReason.STOP


def test_missing_sampled_token_is_an_error():
    scheduler = make_scheduler()
    add(scheduler, "a", 2)
    out = scheduler.schedule()
    with pytest.raises(LmcError, match="'a'"):
        scheduler.update_from_output(out, {})


def test_max_model_len_finishes_with_length():
    scheduler = make_scheduler(max_model_len=5)
    seq = add(scheduler, "a", 3)
    step(scheduler)
    step(scheduler)
    assert seq.num_tokens == 5 and seq.finish_reason is FinishReason.LENGTH
    assert seq.block_table == [] and scheduler.num_running == 0


# --- prefix caching through the scheduler ------------------------------------------------------


def test_prefix_hit_starts_the_request_after_the_cached_tokens():
    scheduler = make_scheduler(block_size=4)
    add(scheduler, "a", 10)
    step(scheduler)
    b = add(scheduler, "b", 9)  # same first 9 tokens as a: 2 full blocks cached
    out = step(scheduler)
    assert [(i.seq.request_id, i.start, i.num_new_tokens) for i in out.scheduled] == [("a", 10, 1), ("b", 8, 1)]
    assert b.num_cached_tokens == 8
    stats = scheduler.block_manager
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 9, 8)


def test_disabled_prefix_caching_recomputes_everything():
    scheduler = make_scheduler(block_size=4, prefix_caching=False)
    add(scheduler, "a", 10)
    step(scheduler)
    b = add(scheduler, "b", 9)
    assert rows(step(scheduler)) == [("a", 1), ("b", 9)]
    assert b.num_cached_tokens == 0


# --- randomized invariants -------------------------------------------------------------------


# Prompts start with a random-length piece of one shared system prompt, so prefix hits are common.
SYSTEM_PROMPT = tuple(range(3, 19))
requests = st.lists(
    st.tuples(
        st.integers(0, len(SYSTEM_PROMPT)),  # length of the shared start
        st.lists(st.integers(0, 2), max_size=6),  # own tail
        st.integers(1, 10),  # max_tokens
        st.integers(1, 3),  # copies side by side, like n > 1
    ),
    min_size=1,
    max_size=4,
)


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps, aborts and engine stops against a fake model that checks the KV it reads.

    The fake KV cache stores, in every slot it writes, the whole token prefix up
    to that position; a chunk may only be computed on top of slots holding
    exactly its own prefix, which catches any wrong prefix-cache hit or block
    shared while being written.
    """

    @initialize(
        block_size=st.integers(1, 4),
        num_blocks=st.integers(1, 16),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 12),
        max_model_len=st.integers(2, 40),
        prefix_caching=st.booleans(),
        first_requests=requests,
    )
    def setup(self, block_size, num_blocks, max_num_seqs, budget, max_model_len, prefix_caching, first_requests):
        self.scheduler = make_scheduler(
            num_blocks=num_blocks,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            budget=budget,
            max_model_len=max_model_len,
            prefix_caching=prefix_caching,
        )
        self.kv: dict[tuple[int, int], tuple[int, ...]] = {}  # (block id, slot) -> prefix it was computed for
        self.max_tokens: dict[str, int] = {}
        self.admitted: list[Sequence] = []
        self.add(first_requests)

    @property
    def live(self) -> list[Sequence]:
        return [seq for seq in self.admitted if not seq.is_finished]

    @rule(new_requests=requests)
    def add(self, new_requests):
        for shared, tail, max_tokens, copies in new_requests:
            for _ in range(copies):
                seq = Sequence(f"r{len(self.max_tokens)}", SYSTEM_PROMPT[:shared] + tuple(tail),
                               max_output_tokens=max_tokens)
                self.max_tokens[seq.request_id] = max_tokens
                if self.scheduler.add(seq):
                    self.admitted.append(seq)
                else:
                    assert seq.finish_reason is FinishReason.ERROR and seq.error_message

    @rule(data=st.data(), num_steps=st.integers(1, 4))
    def step(self, data, num_steps):
        for _ in range(num_steps):
            self.engine_step(lambda: data.draw(st.integers(0, 2)), lambda: data.draw(st.integers(0, 9)) == 0)

    @rule(pick=st.integers(0, 11))
    def abort(self, pick):
        live = self.live
        if live:
            assert self.scheduler.abort(live[pick % len(live)].request_id)

    def engine_step(self, next_token: Callable[[], int], eos: Callable[[], bool]) -> None:
        out = self.scheduler.schedule()
        assert out.num_batched_tokens <= self.scheduler.config.max_num_batched_tokens
        for item in out.scheduled:
            self.fake_forward(item.seq, item.start, item.num_new_tokens)
        sampled = {item.seq.request_id: next_token() for item in out.scheduled if item.samples}
        self.scheduler.advance(out)
        for seq in self.read_back(out, sampled):
            self.engine_stop_check(seq, eos())

    def read_back(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Resolve the tokens the engine reads back this step: this step's own."""
        return self.scheduler.resolve(out, sampled)

    def fake_forward(self, seq: Sequence, start: int, num_new: int) -> None:
        size = self.scheduler.block_manager.block_size
        for pos in range(start):  # everything the attention reads must be this sequence's own prefix
            assert self.kv[seq.block_table[pos // size], pos % size] == self.prefix(seq, pos + 1)
        for pos in range(start, start + num_new):
            block = seq.block_table[pos // size]
            assert self.scheduler.block_manager._blocks[block].ref_count == 1  # never write a shared block
            self.kv[block, pos % size] = self.prefix(seq, pos + 1)

    def prefix(self, seq: Sequence, end: int) -> tuple[int, ...]:
        return seq.token_slice(0, end)

    def engine_stop_check(self, seq: Sequence, eos: bool) -> None:
        assert seq.num_tokens <= self.scheduler.config.max_model_len
        if seq.is_finished:
            assert seq.finish_reason is FinishReason.LENGTH
        elif seq.num_output_tokens - seq.has_pending_token >= self.max_tokens[seq.request_id]:
            self.scheduler.finish(seq, FinishReason.LENGTH)
        elif eos:
            self.scheduler.finish(seq, FinishReason.STOP)

    @invariant()
    def blocks_are_neither_leaked_nor_owned_twice(self):
        bm = self.scheduler.block_manager
        owners = [b for seq in self.scheduler.running for b in seq.block_table]
        for seq in self.scheduler.running:
            assert len(set(seq.block_table)) == len(seq.block_table)
            assert len(seq.block_table) == bm.blocks_for(seq.num_computed_tokens)
            assert seq.num_computed_tokens < seq.num_tokens
        assert all(not seq.block_table for seq in self.scheduler.waiting)
        assert [block.ref_count for block in bm._blocks] == [owners.count(i) for i in range(bm.num_blocks)]
        free = set(bm._free)
        assert free.isdisjoint(owners) and len(free) + len(set(owners)) == bm.num_blocks
        assert all(bm._blocks[b].hash == h for h, b in bm._cached.items())
        assert self.scheduler.num_running <= self.scheduler.config.max_num_seqs
        assert bm.prefix_cache_hits <= bm.prefix_cache_queries

    def teardown(self):
        """With aborts stopped, every live request finishes within a bounded number of steps."""
        # Each step the oldest running request computes >= 1 token and is never preempted,
        # or an idle pool admits the head of the queue.
        bound = sum(s.num_prompt_tokens + self.max_tokens[s.request_id] + 1 for s in self.live) + 2
        for _ in range(bound):
            if not self.scheduler.has_unfinished():
                break
            self.engine_step(lambda: 1, lambda: False)
            self.blocks_are_neither_leaked_nor_owned_twice()
        assert not self.scheduler.has_unfinished()
        bm, max_model_len = self.scheduler.block_manager, self.scheduler.config.max_model_len
        for seq in self.admitted:
            assert seq.is_finished and PENDING not in seq.output_token_ids
            if seq.finish_reason is FinishReason.ERROR:  # only when it could outgrow the whole pool
                longest = min(seq.num_prompt_tokens + self.max_tokens[seq.request_id], max_model_len)
                assert longest - 1 > bm.num_blocks * bm.block_size


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=100, stateful_step_count=20, deadline=None)


class OverlappedSchedulerMachine(SchedulerMachine):
    """The same against the engine's loop: a step is advanced when launched and resolved one step later,
    after the next step was scheduled on top of its PENDING tokens (which the fake model reads as the
    tokens it drew for them, as the engine's decode rows read them on the device)."""

    in_flight: tuple[SchedulerOutput, dict[str, int]] | None = None

    def read_back(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """The previous step's tokens; this step's stay in flight."""
        previous, self.in_flight = self.in_flight, (out, sampled)
        return [] if previous is None else self.scheduler.resolve(*previous)

    def prefix(self, seq: Sequence, end: int) -> tuple[int, ...]:
        tokens = seq.token_slice(0, end)
        if tokens and tokens[-1] == PENDING:
            return tokens[:-1] + (self.in_flight[1][seq.request_id],)
        return tokens


TestOverlappedSchedulerMachine = OverlappedSchedulerMachine.TestCase
TestOverlappedSchedulerMachine.settings = settings(max_examples=100, stateful_step_count=20, deadline=None)
