"""Runtime configuration of turbo, as small validated dataclasses.

Fields are keyword-only so a required field (num_blocks, max_model_len) can sit
after the fields with defaults; every bad value raises LmcError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcompress.errors import LmcError


def _require_positive_int(owner: str, name: str, value: object) -> None:
    # bool is an int subclass; True as a block count is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmcError(f"{owner}.{name} must be an integer >= 1, got {value!r}; pass a positive integer")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The paged KV cache: a preallocated pool of `num_blocks` blocks of `block_size` tokens."""

    block_size: int = 64
    num_blocks: int
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require_positive_int("CacheConfig", "block_size", self.block_size)
        _require_positive_int("CacheConfig", "num_blocks", self.num_blocks)
        if not isinstance(self.enable_prefix_caching, bool):
            raise LmcError(
                f"CacheConfig.enable_prefix_caching must be True or False, "
                f"got {self.enable_prefix_caching!r}; pass a bool"
            )


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one scheduling step and of one request.

    max_num_seqs: most requests running at once (one batch row each).
    max_num_batched_tokens: token budget of one forward pass; longer prompts are
        split into chunks across steps (chunked prefill).
    max_model_len: most tokens (prompt + output) one request may reach.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int

    def __post_init__(self) -> None:
        _require_positive_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs)
        _require_positive_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens)
        _require_positive_int("SchedulerConfig", "max_model_len", self.max_model_len)
        if self.max_model_len < 2:
            raise LmcError(
                f"SchedulerConfig.max_model_len is {self.max_model_len}, which leaves no room for "
                f"a prompt token and an output token; pass max_model_len >= 2"
            )
