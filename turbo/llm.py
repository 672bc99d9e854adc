"""Offline batch generation, like vLLM's `LLM`:

    llm = LLM("path/to/model", kv_cache_dtype="int8")
    outputs = llm.generate(["Hello", [0, 17, 42]], SamplingParams(max_tokens=32))
    outputs[0].outputs[0].text
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

from lmcompress.errors import LmcError
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import LLMEngine, Prompt
from lmcompress.turbo.outputs import RequestOutput
from lmcompress.turbo.sampling_params import SamplingParams


class LLM:
    """An LLMEngine for scripts; `options` are EngineConfig's fields (device, kv_cache_dtype, ...)."""

    def __init__(self, model: str | Path, **options):
        known = {f.name for f in dataclasses.fields(EngineConfig)} - {"model"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LmcError(f"unknown engine option {unknown[0]!r}; use one of {', '.join(sorted(known))}")
        self.engine = LLMEngine(EngineConfig(model=model, **options))
        self._request_ids = itertools.count()

    def generate(self, prompts: Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Complete every prompt (text or token ids), all batched together; outputs in prompt order.

        sampling_params: one for all prompts, or one per prompt; None = SamplingParams().
        Each output holds every choice's whole completion.
        """
        if isinstance(prompts, str):
            raise LmcError("LLM.generate takes a list of prompts, got one string; wrap it in a list")
        params = self._params_per_prompt(len(prompts), sampling_params)
        ids = [f"llm-{next(self._request_ids)}" for _ in prompts]
        try:
            for request_id, prompt, request_params in zip(ids, prompts, params):
                # Only whole completions are returned: decode each one's text once, at its end.
                self.engine.add_request(request_id, prompt, request_params, stream_text=False)
        except LmcError:
            for request_id in ids:  # the prompts before the bad one were queued already
                self.engine.abort(request_id)
            raise
        collected: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                earlier = collected.get(out.request_id)
                collected[out.request_id] = earlier.extended(out) if earlier else out
        return [collected[request_id] for request_id in ids]

    @staticmethod
    def _params_per_prompt(num_prompts: int, sampling_params) -> list[SamplingParams | None]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            return [sampling_params] * num_prompts
        if len(sampling_params) != num_prompts:
            raise LmcError(
                f"got {len(sampling_params)} SamplingParams for {num_prompts} prompts; "
                "pass one for all prompts or exactly one per prompt"
            )
        return list(sampling_params)
