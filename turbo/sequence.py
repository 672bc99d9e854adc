"""One request as the scheduler and the block manager see it.

A sequence's tokens are its prompt followed by its sampled outputs.  The single
progress counter is `num_computed_tokens`: how many leading tokens have their
K/V in the cache.  Every step catches it up towards `num_tokens` (vLLM V1's
rule), which covers prefill, chunked prefill, decode and prefix-cache hits alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# An output token that a forward pass still running on the device samples: the engine launches the next step
# before the last one's tokens reach the host, and the scheduler fills the placeholder in (Scheduler.resolve).
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no KV blocks
    RUNNING = "running"  # admitted, holds KV blocks, scheduled every step the budget allows
    PREEMPTED = "preempted"  # evicted to free memory; queued again and recomputed from token 0
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, stop token or stop string (decided by the engine)
    LENGTH = "length"  # max_tokens (engine) or max_model_len (scheduler)
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # cannot be served; `error_message` says why


@dataclass(eq=False)
class Sequence:
    """A request's token state; `sampling_params` is opaque here and belongs to the engine.

    eq=False: sequences compare and hash by identity, so they can sit in sets.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling_params: object = None
    # The engine's max_tokens: once this many outputs exist (the last possibly PENDING) nothing is left to compute.
    max_output_tokens: int | None = None
    output_token_ids: list[int] = field(default_factory=list, init=False)
    status: SequenceStatus = field(default=SequenceStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    error_message: str | None = field(default=None, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    # Prompt tokens served from the prefix cache at first admission (usage.cached_tokens).
    num_cached_tokens: int = field(default=0, init=False)
    num_preemptions: int = field(default=0, init=False)
    # KV block ids in token order: token i lives in block_table[i // block_size].
    block_table: list[int] = field(default_factory=list, init=False)
    # Position in the scheduler's arrival order (set by Scheduler.add); lower is older.
    arrival_index: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        # Callers pass any iterable (often a list); a tuple keeps the prompt immutable
        # and makes block slices hashable.
        self.prompt_token_ids = tuple(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def has_pending_token(self) -> bool:
        return bool(self.output_token_ids) and self.output_token_ids[-1] == PENDING

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, end: int) -> tuple[int, ...]:
        """Tokens [start, end) of prompt + outputs, without concatenating the whole sequence."""
        split = len(self.prompt_token_ids)
        if end <= split:
            return self.prompt_token_ids[start:end]
        head = self.prompt_token_ids[start:split] if start < split else ()
        return head + tuple(self.output_token_ids[max(start - split, 0) : end - split])
