"""Per-request sampling settings, validated on construction with vLLM's ranges.

Every bad value raises LmcError naming the field, its valid range and the value
given, so the HTTP layer can return it as a 400 as is.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from lmcompress.errors import LmcError

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by
# such a value would only overflow, and the result is argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20
# torch.Generator.manual_seed accepts exactly this range.
_SEED_RANGE = (-(2**63), 2**64 - 1)


def _is_int(value: object) -> bool:
    # bool is an int subclass; `True` as a token count is a caller bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check(name: str, value: object, valid: Callable[[object], bool], expected: str, fix: str) -> None:
    if not valid(value):
        raise LmcError(f"{name} must be {expected}, got {value!r}; {fix}")


def _as_tuple(name: str, value: object) -> tuple:
    # OpenAI clients send `"stop": null` for "no stop strings".
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise LmcError(f"{name} must be a list, got {value!r}; pass a list, or None for none")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's tokens and when to stop.

    temperature: 0 (below 1e-5) means greedy decoding.
    top_k: 0 or -1 turns top-k off.
    logprobs: None, or how many top (token, logprob) pairs to return per step
        besides the sampled token's own logprob (0 = only the sampled token's).
    stop: a string or strings that end the output when generated; accepts a
        str or any sequence of str and stores a tuple (likewise stop_token_ids),
        so SamplingParams stays hashable.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # Frozen: normalise the containers through object.__setattr__.
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        object.__setattr__(self, "stop", _as_tuple("stop", stop))
        object.__setattr__(self, "stop_token_ids", _as_tuple("stop_token_ids", self.stop_token_ids))
        self._check_sampling()
        self._check_output()
        self._check_stop()

    def _check_sampling(self) -> None:
        _check("temperature", self.temperature, lambda v: _is_number(v) and v >= 0, ">= 0 (0 = greedy)",
               "pass 0 for greedy decoding or a positive value such as 0.7")
        _check("top_p", self.top_p, lambda v: _is_number(v) and 0 < v <= 1, "in (0, 1]",
               "pass 1.0 to turn nucleus sampling off")
        _check("top_k", self.top_k, lambda v: _is_int(v) and (v >= 1 or v in (0, -1)), "-1, 0 (off) or >= 1",
               "pass 0 to turn top-k off")
        _check("min_p", self.min_p, lambda v: _is_number(v) and 0 <= v <= 1, "in [0, 1]",
               "pass 0.0 to turn min-p off")
        _check("repetition_penalty", self.repetition_penalty, lambda v: _is_number(v) and v > 0, "> 0",
               "pass 1.0 for no penalty")
        _check("seed", self.seed, lambda v: v is None or (_is_int(v) and _SEED_RANGE[0] <= v <= _SEED_RANGE[1]),
               "None or an integer in [-2**63, 2**64 - 1]", "pass an integer seed or none")

    def _check_output(self) -> None:
        _check("max_tokens", self.max_tokens, lambda v: _is_int(v) and v >= 1, "an integer >= 1",
               "ask for at least one token")
        _check("n", self.n, lambda v: _is_int(v) and v >= 1, "an integer >= 1", "pass n=1 for one completion")
        _check("logprobs", self.logprobs, lambda v: v is None or (_is_int(v) and 0 <= v <= MAX_LOGPROBS),
               f"None or an integer in [0, {MAX_LOGPROBS}]", f"ask for at most {MAX_LOGPROBS} top logprobs")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            _check(name, getattr(self, name), lambda v: isinstance(v, bool), "True or False", "pass a bool")
        if self.n > 1 and self.is_greedy:
            raise LmcError(
                f"n must be 1 when temperature is 0 (greedy decoding gives {self.n} identical completions), "
                f"got n={self.n}; set n=1 or a temperature > 0"
            )

    def _check_stop(self) -> None:
        _check("stop", self.stop, lambda v: all(isinstance(s, str) and s for s in v), "non-empty strings",
               "remove empty stop strings")
        _check("stop_token_ids", self.stop_token_ids, lambda v: all(_is_int(t) and t >= 0 for t in v),
               "integers >= 0", "pass token ids from the model's vocabulary")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def for_choice(self, index: int) -> SamplingParams:
        """Settings of choice `index` of an n > 1 request: n=1, and seed + index when seeded.

        Each choice then samples from its own random stream; with one shared seed
        all n choices would be identical.
        """
        if self.seed is None:
            return dataclasses.replace(self, n=1)
        seed = self.seed + index
        if seed > _SEED_RANGE[1]:  # wrap past the top of torch's seed range
            seed -= 2**64
        return dataclasses.replace(self, n=1, seed=seed)

