"""The offline throughput benchmark behind `lmc bench throughput`, like LMDeploy's profile_throughput
and nano-vllm's bench.py: the engine in-process, no server.

    prompts      num_prompts prompts of input_len random token ids (fixed seed), each asking for
                 exactly output_len tokens (ignore_eos, greedy)
    concurrency  at most C requests in flight: C are added at once and each finished request is
                 replaced by the next before the following step; the engine runs with max_num_seqs C
    warmup       a run of other random prompts first (compiles Triton kernels, warms allocators;
                 CUDA graphs are captured while the engine is built), timed separately

Per request, from the engine's step outputs (the time step() returns with a request's tokens):
    TTFT   add_request -> first token          E2E   add_request -> last token
    TPOT   (last - first token) / (tokens - 1) ITL   gaps between a request's outputs
Per engine step, by wrapping the scheduler's and the model runner's methods on the instances:
    wall        step() call to return; with the overlapped engine (CUDA: turbo/engine.py launches a pass
                before it reads the previous pass's tokens), the wall of the call that read the pass's
                tokens back, which holds the wait for its device work: the time the pass added to the run
    forward     the model forward: CUDA-event time on the GPU (no synchronisation added), host time on the CPU
    outside     wall - forward: schedule, batch build, sampling, detokenisation and bookkeeping in Python, and
                on the GPU the device's work outside the forward or its idle time; negative for a long pass
                overlapped, whose device time began inside the call that launched it
Over the whole run, the forward share (forward time summed over the elapsed time) says how busy the
device was with forward passes.
Decode roofline (CUDA): a decode step must stream every weight except the embedding table plus the
KV of every context token; that many bytes at the copy bandwidth measured in the same run is the
step's lower bound, and the fraction reported is bound / measured.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.resources import PeakMemory, resolve_device
from lmcompress.turbo import kernels
from lmcompress.turbo.bench_kernels import cuda_timer, measure_copy_gbps
from lmcompress.turbo.bench_serve import distribution_ms, random_requests
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import LLMEngine
from lmcompress.turbo.forward_batch import ForwardBatch
from lmcompress.turbo.kernel_profile import kernel_table, profiled, total_device_us
from lmcompress.turbo.model_runner import ModelRunner
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason

# Random 4-bit linears for --dummy runs, by the name the CLI takes.
DUMMY_QUANT = {"none": None, "awq-w4g128": QuantConfig(bits=4, group_size=128, sym=False)}
_ABSENT = object()
PROFILE_ROWS = 40  # kernels kept in the result of a profiled run


@contextmanager
def _wrapped(owner: object, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """Replace owner.name by wrap(owner.name) for the block, then restore it."""
    own = vars(owner).get(name, _ABSENT)
    setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        if own is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, own)


def build_engine(config: EngineConfig, dummy_quant: QuantConfig | None = None) -> LLMEngine:
    """LLMEngine(config); with dummy_quant, its dummy decoder linears are random 4-bit QTensors of that config."""
    return LLMEngine(dataclasses.replace(config, dummy_quant=dummy_quant))


@dataclass(frozen=True)
class ThroughputConfig:
    num_prompts: int
    input_len: int
    output_len: int
    concurrency: int
    seed: int = 0
    warmup_prompts: int | None = None  # None = min(num_prompts, 2 * concurrency); 0 = no warmup

    def __post_init__(self) -> None:
        for name in ("num_prompts", "input_len", "output_len", "concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmcError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}; pass one")
        if self.warmup_prompts is not None and self.warmup_prompts < 0:
            raise LmcError(f"--warmup-prompts must be >= 0, got {self.warmup_prompts}; pass 0 to skip the warmup")

    @property
    def num_warmup_prompts(self) -> int:
        return min(self.num_prompts, 2 * self.concurrency) if self.warmup_prompts is None else self.warmup_prompts

    @property
    def warmup_output_len(self) -> int:
        # Enough decode steps to run every kernel; the decode graphs exist already.
        return min(self.output_len, 16)


# --- per-request traces ---------------------------------------------------------------------------


@dataclass
class RequestTrace:
    """When a request was added and when each of its outputs came back (perf_counter seconds)."""

    prompt_len: int
    added: float
    outputs: list[tuple[float, int]] = field(default_factory=list)  # (time, new tokens)

    @property
    def output_tokens(self) -> int:
        return sum(count for _, count in self.outputs)

    @property
    def ttft(self) -> float:
        return self.outputs[0][0] - self.added

    @property
    def e2e(self) -> float:
        return self.outputs[-1][0] - self.added

    @property
    def tpot(self) -> float | None:
        tokens = self.output_tokens
        return (self.outputs[-1][0] - self.outputs[0][0]) / (tokens - 1) if tokens > 1 else None

    @property
    def itl(self) -> list[float]:
        times = [t for t, _ in self.outputs]
        return [later - earlier for earlier, later in zip(times, times[1:])]


# --- per-step timing ------------------------------------------------------------------------------


@dataclass
class StepRecord:
    wall_s: float
    schedule_s: float = 0.0
    build_s: float = 0.0
    forward_host_s: float = 0.0  # inside runner.forward on the host: kernel launches or a graph replay
    forward_s: float | None = None  # the forward's own time (see the module docstring); None = no forward
    num_seqs: int = 0
    num_tokens: int = 0
    kv_tokens: int = 0  # context tokens attended over all sequences
    decode: bool = False  # every sequence added one token (the steps CUDA graphs replay)

    @property
    def outside_s(self) -> float:
        return self.wall_s - (self.forward_s or 0.0)


class StepProbe:
    """Times the parts of each step, wrapping scheduler.schedule, model_runner.build_batch and
    model_runner.forward on the engine's instances while the probe is entered."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.cuda = engine.model_runner.device.type == "cuda"
        self._calls: list[StepRecord] = []  # one per step() call, with that call's wall
        self._step = StepRecord(wall_s=0.0)
        self._events: list[tuple[StepRecord, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def attached(self) -> Iterator[StepProbe]:
        scheduler, runner = self.engine.scheduler, self.engine.model_runner
        with _wrapped(scheduler, "schedule", self._host_timed("schedule_s")), \
                _wrapped(runner, "build_batch", self._host_timed("build_s")), \
                _wrapped(runner, "forward", self._timed_forward):
            yield self
        self._resolve_events()

    def end_step(self, wall_s: float) -> None:
        self._step.wall_s = wall_s
        self._calls.append(self._step)
        self._step = StepRecord(wall_s=0.0)

    @property
    def records(self) -> list[StepRecord]:
        """One record per pass, with its wall (see pass_walls)."""
        return pass_walls(self._calls, read_back_later=self.cuda and self.engine.overlaps_steps)

    def _host_timed(self, attribute: str) -> Callable[[Callable], Callable]:
        def wrap(method: Callable) -> Callable:
            def timed(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    setattr(self._step, attribute, getattr(self._step, attribute) + time.perf_counter() - start)
            return timed
        return wrap

    def _timed_forward(self, forward: Callable[[ForwardBatch], torch.Tensor]) -> Callable:
        def timed(batch: ForwardBatch) -> torch.Tensor:
            step = self._step
            step.num_seqs, step.num_tokens = batch.num_seqs, batch.num_tokens
            step.kv_tokens = sum(batch.context_lens)
            step.decode = max(batch.query_lens) == 1 and len(batch.logits_indices) == batch.num_seqs
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self.cuda else None
            if events:
                events[0].record()
            start = time.perf_counter()
            logits = forward(batch)
            step.forward_host_s = time.perf_counter() - start
            if events:
                events[1].record()
                self._events.append((step, *events))
            else:
                step.forward_s = step.forward_host_s
            return logits
        return timed

    def _resolve_events(self) -> None:
        if self._events:
            torch.cuda.synchronize()
        for step, start, end in self._events:
            step.forward_s = start.elapsed_time(end) / 1e3
        self._events.clear()


def pass_walls(calls: list[StepRecord], read_back_later: bool) -> list[StepRecord]:
    """The step() calls' records as one record per forward pass, with the wall time the pass added.

    Without overlap a call runs its pass and reads its tokens: the pass's wall is the call's.  When the
    engine reads a pass's tokens back in the next call while the device runs the pass (read_back_later:
    the overlapped engine on CUDA), that next call's wall holds the wait for the pass's device work, so
    it is the pass's wall; a call that launched nothing only reads back.
    """
    if not read_back_later:
        return [call for call in calls if call.num_tokens]
    passes = []
    for launched, reader in zip(calls, calls[1:]):
        if launched.num_tokens:
            passes.append(dataclasses.replace(launched, wall_s=reader.wall_s))
    return passes


# --- the run --------------------------------------------------------------------------------------


@dataclass
class RunTrace:
    requests: list[RequestTrace]
    steps: list[StepRecord]
    elapsed_s: float  # first add_request to the last output


def drive(engine: LLMEngine, prompts: list[list[int]], output_len: int, concurrency: int) -> RunTrace:
    """Serve every prompt (exactly output_len greedy tokens each) with at most `concurrency` in flight."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    traces: list[RequestTrace] = []
    probe = StepProbe(engine)
    in_flight = 0
    start = time.perf_counter()
    with probe.attached():
        while len(traces) < len(prompts) or engine.has_unfinished():
            while in_flight < concurrency and len(traces) < len(prompts):
                prompt = prompts[len(traces)]
                engine.add_request(str(len(traces)), prompt, params, stream_text=False)  # text unread
                traces.append(RequestTrace(len(prompt), time.perf_counter()))
                in_flight += 1
            step_start = time.perf_counter()
            outputs = engine.step()
            now = time.perf_counter()
            probe.end_step(now - step_start)
            for out in outputs:
                (choice,) = out.outputs
                if choice.finish_reason == FinishReason.ERROR:
                    raise LmcError(f"benchmark request {out.request_id} failed: {choice.error}; "
                                   "fix the engine options (e.g. --max-model-len, KV cache size) and rerun")
                if choice.token_ids:
                    traces[int(out.request_id)].outputs.append((now, len(choice.token_ids)))
                if out.finished:
                    in_flight -= 1
    return RunTrace(traces, probe.records, time.perf_counter() - start)


def bench_prompts(engine: LLMEngine, num: int, input_len: int, seed: int) -> list[list[int]]:
    requests = random_requests(num, input_len, 1, seed, engine.tokenizer, as_token_ids=True)
    return [request.prompt for request in requests]


def decode_weight_bytes(runner: ModelRunner) -> int:
    """Weight bytes a decode step streams: all of them but the embedding table, of which it reads
    only the new tokens' rows (unless the LM head shares it)."""
    embed = 0 if runner.config.tie_word_embeddings else runner.model.embed_tokens.nbytes
    return runner.weight_bytes() - embed


def run_throughput(engine_config: EngineConfig, bench: ThroughputConfig, quant: str = "none",
                   profile: bool = False) -> dict:
    """Build the engine (max_num_seqs = concurrency; `quant` a DUMMY_QUANT name), warm it up, run the
    benchmark; the figures as a dict.  With `profile` the timed run is profiled and the result gains
    "kernels": device time per kernel (turbo/kernel_profile.py), which slows the host side a little."""
    if quant not in DUMMY_QUANT:
        raise LmcError(f"unknown --quant {quant!r}; use one of {', '.join(DUMMY_QUANT)}")
    device = resolve_device(engine_config.device)
    copy_gbps = None
    if kernels.available(device):
        copy_gbps = measure_copy_gbps(device, cuda_timer())
        torch.cuda.empty_cache()  # hand the copy buffers back before the KV pool is sized from free memory
    engine_config = dataclasses.replace(engine_config, max_num_seqs=bench.concurrency)
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        engine = build_engine(engine_config, DUMMY_QUANT[quant])
        build_s = time.perf_counter() - start
        _check_lengths(engine, bench)
        warmup_s = 0.0
        if bench.num_warmup_prompts:
            warmup = bench_prompts(engine, bench.num_warmup_prompts, bench.input_len, bench.seed + 1)
            warmup_s = drive(engine, warmup, bench.warmup_output_len, bench.concurrency).elapsed_s
        preempted = engine.stats().num_preemptions
        prompts = bench_prompts(engine, bench.num_prompts, bench.input_len, bench.seed)
        with profiled(device) if profile else nullcontext() as prof:
            run = drive(engine, prompts, bench.output_len, bench.concurrency)
        preempted = engine.stats().num_preemptions - preempted
    runner = engine.model_runner
    return {
        "config": {**dataclasses.asdict(bench), "warmup_prompts": bench.num_warmup_prompts,
                   "quant": quant, "engine": _json_ready(dataclasses.asdict(engine_config))},
        "setup": {"device": str(runner.device), "engine_build_s": build_s, "warmup_s": warmup_s},
        "memory": {"weight_bytes": runner.weight_bytes(), "kv_cache_bytes": runner.kv_cache_bytes(),
                   "kv_bytes_per_token": runner.kv_spec.bytes_per_token(),
                   "kv_capacity_tokens": engine.kv_capacity_tokens, "peak_bytes": peak.bytes,
                   "peak_kind": peak.kind},
        "throughput": {**throughput_figures(run), "preemptions": preempted},
        "latency_ms": latency_figures(run.requests),
        "steps": {"forward_clock": "cuda_events" if runner.device.type == "cuda" else "host",
                  "all": step_figures(run.steps), "prompt": step_figures([s for s in run.steps if not s.decode]),
                  "decode": step_figures([s for s in run.steps if s.decode])},
        "roofline": None if copy_gbps is None else roofline_figures(
            run.steps, copy_gbps, decode_weight_bytes(runner), runner.kv_spec.bytes_per_token()),
        "requests": [{"prompt_len": r.prompt_len, "output_tokens": r.output_tokens, "ttft_ms": 1e3 * r.ttft,
                      "tpot_ms": None if r.tpot is None else 1e3 * r.tpot, "e2e_ms": 1e3 * r.e2e}
                     for r in run.requests],
        **({"kernels": kernel_figures(prof, device, run)} if profile else {}),
    }


def kernel_figures(prof, device: torch.device, run: RunTrace) -> dict:
    """The profile's device time per kernel (the top PROFILE_ROWS), in total and per engine step."""
    rows = kernel_table(prof, device)
    steps = max(1, len(run.steps))
    return {"device_us_total": total_device_us(rows), "wall_us_total": 1e6 * run.elapsed_s, "steps": steps,
            "rows": [{**row.to_dict(), "us_per_step": row.total_us / steps} for row in rows[:PROFILE_ROWS]]}


def _check_lengths(engine: LLMEngine, bench: ThroughputConfig) -> None:
    longest = engine.model_runner.max_model_len
    if bench.input_len + bench.output_len > longest:
        raise LmcError(f"--input-len {bench.input_len} + --output-len {bench.output_len} exceed the engine's "
                       f"max_model_len {longest}; shorten them or raise --max-model-len")


def _json_ready(values: dict) -> dict:
    return {key: value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in values.items()}


# --- figures --------------------------------------------------------------------------------------


def throughput_figures(run: RunTrace) -> dict:
    input_tokens = sum(r.prompt_len for r in run.requests)
    output_tokens = sum(r.output_tokens for r in run.requests)
    return {
        "completed": len(run.requests), "elapsed_s": run.elapsed_s,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "output_tok_s": output_tokens / run.elapsed_s,
        "total_tok_s": (input_tokens + output_tokens) / run.elapsed_s,
        "request_s": len(run.requests) / run.elapsed_s,
        "forward_share": sum(s.forward_s for s in run.steps if s.forward_s is not None) / run.elapsed_s,
    }


def latency_figures(requests: list[RequestTrace]) -> dict:
    return {
        "ttft": distribution_ms([r.ttft for r in requests]),
        "tpot": distribution_ms([r.tpot for r in requests if r.tpot is not None]),
        "itl": distribution_ms([gap for r in requests for gap in r.itl]),
        "e2e": distribution_ms([r.e2e for r in requests]),
    }


def step_figures(steps: list[StepRecord]) -> dict:
    """Means per step (ms) over the steps that ran a forward, and the share of wall time outside it."""
    steps = [s for s in steps if s.forward_s is not None]
    if not steps:
        return {"steps": 0}

    def mean_ms(values: list[float]) -> float:
        return 1e3 * float(np.mean(values))

    wall = sum(s.wall_s for s in steps)
    return {
        "steps": len(steps),
        "seqs_per_step": float(np.mean([s.num_seqs for s in steps])),
        "tokens_per_step": float(np.mean([s.num_tokens for s in steps])),
        "wall_ms": mean_ms([s.wall_s for s in steps]),
        "forward_ms": mean_ms([s.forward_s for s in steps]),
        "outside_ms": mean_ms([s.outside_s for s in steps]),
        "outside_fraction": sum(s.outside_s for s in steps) / wall,
        "schedule_ms": mean_ms([s.schedule_s for s in steps]),
        "build_batch_ms": mean_ms([s.build_s for s in steps]),
        "forward_host_ms": mean_ms([s.forward_host_s for s in steps]),
    }


def roofline_figures(steps: list[StepRecord], copy_gbps: float, weight_bytes: int, kv_bytes_per_token: int) -> dict:
    """How close decode steps come to streaming their weights and KV at the copy bandwidth."""
    decode = [s for s in steps if s.decode and s.forward_s is not None]
    bound_s = [(weight_bytes + s.kv_tokens * kv_bytes_per_token) / (copy_gbps * 1e9) for s in decode]
    return {
        "copy_gbps": copy_gbps,
        "decode_weight_bytes": weight_bytes,
        "decode_bound_ms": 1e3 * float(np.mean(bound_s)) if decode else None,
        "of_step_wall": sum(bound_s) / sum(s.wall_s for s in decode) if decode else None,
        "of_forward": sum(bound_s) / sum(s.forward_s for s in decode) if decode else None,
    }


def table_rows(result: dict) -> list[tuple[str, str]]:
    """The result as (label, value) rows for a two-column table."""
    t, lat, mem, setup = result["throughput"], result["latency_ms"], result["memory"], result["setup"]
    rows = [
        ("Device", setup["device"]),
        ("Requests", f"{t['completed']} x ({result['config']['input_len']} in, {result['config']['output_len']} out), "
                     f"concurrency {result['config']['concurrency']}"),
        ("Engine build (s)", f"{setup['engine_build_s']:.2f}"),
        ("Warmup (s)", f"{setup['warmup_s']:.2f}"),
        ("Elapsed (s)", f"{t['elapsed_s']:.3f}"),
        ("Output tok/s", f"{t['output_tok_s']:.1f}"),
        ("Total tok/s", f"{t['total_tok_s']:.1f}"),
        ("Requests/s", f"{t['request_s']:.3f}"),
        ("Forward share of elapsed", f"{100 * t['forward_share']:.1f}%"),
        ("Preemptions", str(t["preemptions"])),
    ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        rows.append((f"{label} p50 / p99 (ms)", f"{_ms(lat[name]['p50'])} / {_ms(lat[name]['p99'])}"))
    rows += [
        ("Weights (MiB)", f"{mem['weight_bytes'] / 2**20:.1f}"),
        ("KV cache (MiB, tokens)", f"{mem['kv_cache_bytes'] / 2**20:.1f}, {mem['kv_capacity_tokens']}"),
        (f"Peak memory (MiB, {mem['peak_kind']})", f"{mem['peak_bytes'] / 2**20:.1f}"),
    ]
    for kind in ("all", "prompt", "decode"):  # prompt: every step that is not decode only (mixed ones too)
        steps = result["steps"][kind]
        if steps["steps"]:
            rows.append((f"{kind.capitalize()} steps: n, wall / forward / outside (ms)",
                         f"{steps['steps']}, {steps['wall_ms']:.3f} / {steps['forward_ms']:.3f} / "
                         f"{steps['outside_ms']:.3f}"))
    roof = result["roofline"]
    if roof is not None and roof["of_step_wall"] is not None:
        rows.append(("Decode roofline: bound (ms), of wall, of forward",
                     f"{roof['decode_bound_ms']:.3f}, {100 * roof['of_step_wall']:.1f}%, "
                     f"{100 * roof['of_forward']:.1f}%"))
    return rows


KERNEL_TABLE_ROWS = 15


def kernel_rows(result: dict) -> list[tuple[str, ...]]:
    """A profiled run's top kernels as (kernel, calls, us per step, share of device time) rows."""
    kernels = result["kernels"]
    rows = [(row["name"], str(row["calls"]), f"{row['us_per_step']:.1f}", f"{100 * row['share']:.1f}%")
            for row in kernels["rows"][:KERNEL_TABLE_ROWS]]
    busy = kernels["device_us_total"] / kernels["wall_us_total"]
    return rows + [("all kernels (device busy share of wall time)", "",
                    f"{kernels['device_us_total'] / kernels['steps']:.1f}", f"{100 * busy:.1f}%")]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
