"""LLMEngine: turbo's step loop, in nano-vllm's shape.

    step() = schedule -> launch -> resolve the previous launch
      schedule     the Scheduler picks this step's rows: prompt chunks and decodes together
      launch       ModelRunner.forward on those rows and the Sampler's draw of one token for
                   every row that reached its sequence's last token, queued on the device;
                   Scheduler.advance counts the rows computed and gives each sampling
                   sequence a PENDING token, which the next step's decode row reads on the device
      resolve      the previous launch's tokens arrive (Scheduler.resolve fills its PENDING
                   tokens in); each sequence's StopChecker turns its new token into text and
                   decides eos, stop token, stop string or max_tokens; finished sequences leave
                   the scheduler

Resolving one step late keeps the device busy while the host does its per-step work
(SGLang's overlap scheduler, LMDeploy's async engine); on the CPU, where nothing runs
asynchronously, each step is resolved before step() returns.  Its price: a sequence stopped by
eos or a stop string has had one more decode row computed, and dropped.  A sequence at
max_tokens or max_model_len is known to end without its token's value and gets no extra
row; a step whose sampler reads histories (repetition penalty) waits for the tokens first.

A request asking for n completions runs n Sequences ("choices"); outputs are
grouped per request.  A request that cannot be served (a prompt longer than
max_model_len or than the whole KV pool) finishes with an error output while the
others continue, and so does every request of a step whose forward pass fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
from collections import abc
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmcompress.errors import LmcError
from lmcompress.resources import resolve_device
from lmcompress.turbo.config import DEFAULT_CPU_KV_CACHE_BYTES, CacheConfig, EngineConfig, SchedulerConfig
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.model_runner import ModelRunner, RunnerOptions
from lmcompress.turbo.outputs import CompletionOutput, EngineStats, RequestOutput, Usage
from lmcompress.turbo.sampler import Sampler, SamplerOutput, SamplingRow, TokenLogprobs
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from lmcompress.turbo.sequence import FinishReason, Sequence
from lmcompress.turbo.stop import StopChecker
from lmcompress.turbo.transfer import HostCopy, to_device

logger = logging.getLogger(__name__)

Prompt = str | abc.Sequence[int]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def build_model_runner(config: EngineConfig) -> ModelRunner:
    """The ModelRunner (weights and KV pool) that `config` describes."""
    device = resolve_device(config.device)
    budget = config.kv_cache_bytes
    if budget is None and config.num_kv_blocks is None and device.type == "cpu":
        budget = DEFAULT_CPU_KV_CACHE_BYTES
    options = RunnerOptions(
        device=str(device), dtype=config.dtype, kv_cache_dtype=config.kv_cache_dtype, kv_scales=config.kv_quant,
        block_size=config.block_size, num_blocks=config.num_kv_blocks, kv_cache_budget=budget,
        kv_cache_memory_fraction=config.gpu_memory_utilization, max_model_len=config.max_model_len,
        dummy=config.dummy_weights, dummy_quant=config.dummy_quant, dequantize_weights=config.dequantize_weights,
        cuda_graphs=not config.enforce_eager, max_num_seqs=config.max_num_seqs, seed=config.seed or 0,
    )
    return ModelRunner(config.model, options)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = Path(path)
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise LmcError(
            f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); copy the model's tokenizer there "
            "or pass the tokenizer directory (EngineConfig.tokenizer, --tokenizer)"
        )
    return AutoTokenizer.from_pretrained(path)


def read_eos_token_ids(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokens that end generation: generation_config.json's eos (else config.json's) and the tokenizer's."""
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        declared = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        if declared is not None:
            ids.update(declared if isinstance(declared, list) else [declared])
            break
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _overlap_steps(device: torch.device) -> bool:
    """Launch a step before reading the previous one's tokens: on CUDA, whose queue runs on while the host
    works; not on the CPU, where a forward pass runs inside its call and every output would only come a step
    later.  LMC_OVERLAP=1 / 0 forces it on / off (tests; A/B timing; ruling it out of a problem)."""
    forced = os.environ.get("LMC_OVERLAP")
    return device.type == "cuda" if forced is None else forced != "0"


@dataclass(eq=False)
class _Choice:
    """One Sequence of a request and what it produced since its last output."""

    index: int
    seq: Sequence
    stop: StopChecker
    # The sampler's view of seq, built once: it holds seq's own output list, which grows in place.
    sampling_row: SamplingRow
    new_token_ids: list[int] = field(default_factory=list)
    new_text: list[str] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    reported_final: bool = False

    def finish(self, reason: FinishReason, stop_reason: str | int | None = None, error: str | None = None) -> None:
        if self.finish_reason is None:
            self.finish_reason, self.stop_reason, self.error = reason, stop_reason, error

    @property
    def wants_logprobs(self) -> bool:
        return self.seq.sampling_params.logprobs is not None

    @property
    def has_news(self) -> bool:
        return bool(self.new_token_ids) or (self.finish_reason is not None and not self.reported_final)

    def take_output(self) -> CompletionOutput:
        out = CompletionOutput(
            index=self.index, token_ids=tuple(self.new_token_ids), text="".join(self.new_text),
            logprobs=tuple(self.new_logprobs) if self.wants_logprobs else None,
            finish_reason=self.finish_reason, stop_reason=self.stop_reason, error=self.error,
        )
        self.new_token_ids, self.new_text, self.new_logprobs = [], [], []
        self.reported_final = self.finish_reason is not None
        return out


@dataclass(eq=False)
class _InFlight:
    """A launched forward pass whose sampled tokens are on their way to the host."""

    scheduled: SchedulerOutput
    sampling: list[Sequence]  # the sequences of sampled's rows, in order
    sampled: SamplerOutput | None  # token_ids [len(sampling)] on the device: the next step's decode inputs
    token_ids: HostCopy | None = field(init=False)
    # The next step's sampler reads these sequences' histories (repetition penalty), which must hold real
    # tokens: that step waits for this one's.
    needs_history: bool = field(init=False)

    def __post_init__(self) -> None:
        self.token_ids = HostCopy(self.sampled.token_ids) if self.sampled is not None else None
        self.needs_history = any(seq.sampling_params.repetition_penalty != 1.0 for seq in self.sampling)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    choices: list[_Choice]

    def take_output(self) -> RequestOutput | None:
        """What the request's choices produced since its last output; None when nothing did."""
        news = tuple([choice.take_output() for choice in self.choices if choice.has_news])
        if not news:
            return None
        finished = all([choice.reported_final for choice in self.choices])
        return RequestOutput(self.request_id, self.prompt_token_ids, news, finished, self.usage())

    def usage(self) -> Usage:
        seqs = [choice.seq for choice in self.choices]  # lists, not generators: this runs per request per step
        return Usage(
            prompt_tokens=len(self.prompt_token_ids),
            completion_tokens=sum([seq.num_output_tokens for seq in seqs]),
            cached_tokens=min([seq.num_cached_tokens for seq in seqs]),
        )


class LLMEngine:
    """Owns the model runner, scheduler, sampler and per-request state; not thread-safe
    (AsyncEngine runs it in one thread)."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.model_runner = build_model_runner(config)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.eos_token_ids = read_eos_token_ids(Path(config.model), self.tokenizer)
        runner = self.model_runner
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=runner.max_model_len),
            CacheConfig(block_size=runner.block_size, num_blocks=runner.num_blocks,
                        enable_prefix_caching=config.enable_prefix_caching),
        )
        self.sampler = Sampler(runner.device, config.seed)
        self._requests: dict[str, _Request] = {}
        self._in_flight: _InFlight | None = None
        self.overlaps_steps = _overlap_steps(runner.device)
        self._choice_of: dict[Sequence, _Choice] = {}
        self._seq_ids = itertools.count()
        self._prompt_tokens = self._generation_tokens = self._computed_tokens = 0
        logger.info("%s", self.capacity_report())

    # --- capacity -------------------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV pool holds."""
        return self.model_runner.num_blocks * self.model_runner.block_size

    def capacity_report(self) -> str:
        runner, spec = self.model_runner, self.model_runner.kv_spec
        quant = f" {self.config.kv_quant}" if spec.bits else ""
        return (
            f"turbo: KV cache holds {self.kv_capacity_tokens} tokens ({runner.num_blocks} blocks of "
            f"{runner.block_size}; {spec.dtype}{quant}, {spec.bytes_per_token()} bytes/token, "
            f"{runner.kv_cache_bytes() / 2**20:.1f} MiB); weights {runner.weight_bytes() / 2**20:.1f} MiB on "
            f"{runner.device}; max_model_len {runner.max_model_len}"
        )

    # --- requests -------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    stream_text: bool = True) -> None:
        """Queue a request; its outputs come from later step() calls.

        stream_text=False: a caller that reads the text only once the request is done
        (LLM.generate, benchmarks) gets it all in the last output, decoded once, while
        earlier outputs carry token ids and "" (stop strings still decode every step).

        Bad input (duplicate id, out-of-vocabulary token ids) raises LmcError.  A
        prompt too long to serve is accepted and finishes with an error output.
        """
        if request_id in self._requests:
            raise LmcError(f"request id {request_id!r} is already in flight; give every request a unique id")
        prompt_ids = self._prompt_token_ids(prompt)
        params = params or SamplingParams()
        choices = [self._new_choice(i, prompt_ids, params, stream_text) for i in range(params.n)]
        self._requests[request_id] = _Request(request_id, prompt_ids, choices)
        self._prompt_tokens += len(prompt_ids)
        for choice in choices:
            self._choice_of[choice.seq] = choice
            self.scheduler.add(choice.seq)  # a rejected sequence is reported by the next step

    def abort(self, request_id: str) -> bool:
        """Finish every choice of the request as aborted and free its KV blocks now; False if unknown.

        The request's last output (finish_reason ABORT) comes from the next step().
        """
        request = self._requests.get(request_id)
        if request is None:
            return False
        for choice in request.choices:
            self.scheduler.abort(choice.seq.request_id)
        return True

    def has_unfinished(self) -> bool:
        """True while some request has not yet had its last output."""
        return bool(self._requests)

    def _prompt_token_ids(self, prompt: Prompt) -> tuple[int, ...]:
        if isinstance(prompt, str):
            return tuple(self.tokenizer(prompt)["input_ids"])
        ids = tuple(prompt)
        vocab = self.model_runner.vocab_size
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise LmcError(
                f"prompt token ids must be integers in [0, {vocab}), got {bad[0]!r}; "
                "pass text or ids from this model's tokenizer"
            )
        return ids

    def _new_choice(self, index: int, prompt_ids: tuple[int, ...], params: SamplingParams,
                    stream_text: bool) -> _Choice:
        params = params.for_choice(index) if params.n > 1 else params
        # Stop at max_model_len through max_tokens, so the StopChecker flushes held-back text then too.
        room = self.model_runner.max_model_len - len(prompt_ids)
        if params.max_tokens > room > 0:
            params = dataclasses.replace(params, max_tokens=room)
        seq = Sequence(str(next(self._seq_ids)), prompt_ids, params, max_output_tokens=params.max_tokens)
        generator = None if params.seed is None or params.is_greedy else self.sampler.request_generator(params.seed)
        stop = StopChecker(params, self.tokenizer, prompt_ids, self.eos_token_ids, stream_text)
        return _Choice(index, seq, stop, SamplingRow(params, seq.prompt_token_ids, seq.output_token_ids, generator))

    # --- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; returns the outputs of the requests that made progress or finished.

        The step's forward pass is launched before the previous pass's tokens are read back, so the host
        works through that pass's outputs while the device runs this one.
        """
        if self._in_flight is not None and self._in_flight.needs_history:
            self._resolve()
        scheduled = self.scheduler.schedule()
        for seq in scheduled.finished:
            self._on_scheduler_finished(seq)
        launched = self._launch(scheduled) if scheduled.scheduled else None
        self._resolve()
        self._in_flight = launched
        if not self.overlaps_steps:
            self._resolve()
        return self._collect_outputs()

    def _on_scheduler_finished(self, seq: Sequence) -> None:
        """Drop a finished sequence's state; record its end if the scheduler caused it (abort, error)."""
        choice = self._choice_of.pop(seq)
        choice.finish(seq.finish_reason, error=seq.error_message)

    def _launch(self, scheduled: SchedulerOutput) -> _InFlight | None:
        """Queue the forward pass and sampling of `scheduled` on the device; None if that fails."""
        items = scheduled.scheduled
        sampling = [item.seq for item in items if item.samples]
        try:
            batch = self.model_runner.build_batch([
                SeqInput(item.token_ids(), item.start, item.seq.block_table, "last" if item.samples else "none")
                for item in items
            ])
            self._fill_pending_inputs(batch, items)
            logits = self.model_runner.forward(batch)  # [len(sampling), vocab]
            rows = [self._choice_of[seq].sampling_row for seq in sampling]
            sampled = self.sampler(logits, rows) if sampling else None
        except Exception as exc:  # fail this step's requests, keep serving the others
            self._fail(items, exc)
            return None
        self.scheduler.advance(scheduled)
        self._computed_tokens += scheduled.num_batched_tokens
        return _InFlight(scheduled, sampling, sampled)

    def _fill_pending_inputs(self, batch: ForwardBatch, items: list[ScheduledSeq]) -> None:
        """Decode rows whose input is the in-flight pass's sample read it on the device: batch.input_ids is
        PENDING there until now."""
        in_flight = self._in_flight
        if in_flight is None:
            return
        sample_row = {seq: i for i, seq in enumerate(in_flight.sampling)}
        targets, sources, row = [], [], 0
        for item in items:
            row += item.num_new_tokens
            if item.seq.has_pending_token and item.start + item.num_new_tokens == item.seq.num_tokens:
                targets.append(row - 1)
                sources.append(sample_row[item.seq])
        if targets:
            index = to_device(targets + sources, batch.input_ids.device, torch.int64).view(2, -1)
            batch.input_ids.index_copy_(0, index[0], in_flight.sampled.token_ids.index_select(0, index[1]))

    def _resolve(self) -> None:
        """Read back the in-flight pass's tokens and run the stop checks on them."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None or in_flight.sampled is None:
            return
        try:
            token_ids = in_flight.token_ids.tolist()
        except Exception as exc:  # a device error of that pass surfaces here
            self._fail(in_flight.scheduled.scheduled, exc)
            return
        tokens = dict(zip(in_flight.sampling, token_ids))
        logprobs = dict(zip(in_flight.sampling, in_flight.sampled.logprobs))
        updated = self.scheduler.resolve(in_flight.scheduled, {seq.request_id: tokens[seq] for seq in tokens})
        self._generation_tokens += len(updated)
        for seq in updated:
            self._postprocess(seq, tokens[seq], logprobs[seq])

    def _fail(self, items: list[ScheduledSeq], exc: Exception) -> None:
        logger.error("turbo: forward pass failed; failing the %d requests of this step", len(items), exc_info=exc)
        message = f"the model failed on this step ({type(exc).__name__}: {exc}); retry the request"
        for item in items:
            if not item.seq.is_finished:
                self._finish(item.seq, FinishReason.ERROR, error=message)

    def _postprocess(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        choice = self._choice_of[seq]
        delta = choice.stop.append(token)
        choice.new_token_ids.append(token)
        choice.new_text.append(delta.text)
        if logprobs is not None:
            choice.new_logprobs.append(logprobs)
        if delta.finish_reason is not None:
            self._finish(seq, delta.finish_reason, stop_reason=delta.stop_reason)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None = None,
                error: str | None = None) -> None:
        self.scheduler.finish(seq, reason, error)
        self._choice_of[seq].finish(reason, stop_reason, error)

    def _collect_outputs(self) -> list[RequestOutput]:
        outputs = []
        for request in list(self._requests.values()):
            output = request.take_output()
            if output is None:
                continue
            outputs.append(output)
            if output.finished:
                del self._requests[request.request_id]
        return outputs

    # --- statistics -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        blocks = self.scheduler.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_usage=blocks.usage,
            num_free_blocks=blocks.num_free_blocks,
            num_total_blocks=blocks.num_blocks,
            kv_capacity_tokens=self.kv_capacity_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            computed_tokens=self._computed_tokens,
        )
