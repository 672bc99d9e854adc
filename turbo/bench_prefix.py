"""What prefix caching buys a conversation: time to first token of turn 2 against turn 1.

Turn 1's prompt is a long context (a document, a system prompt, earlier turns) plus a
question; turn 2's prompt is turn 1's prompt, the answer the engine gave and a new
question.  With prefix caching every full KV block of turn 1 is a cache hit in turn 2,
so only the tail is computed.  The same run with caching off gives the cost of
recomputing it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.turbo.bench_throughput import drive
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import LLMEngine
from lmcompress.turbo.sampling_params import SamplingParams


@dataclass(frozen=True)
class PrefixBenchConfig:
    prefix_len: int = 32768  # the shared context
    question_len: int = 32  # each turn's new question
    output_len: int = 32  # each turn's answer
    seed: int = 0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field.name == "seed" else 1):
                raise LmcError(f"--{field.name.replace('_', '-')} must be a positive integer, got {value!r}")

    @property
    def longest_prompt(self) -> int:
        return self.prefix_len + 2 * self.question_len + self.output_len


def serve_turn(engine: LLMEngine, request_id: str, prompt: list[int], output_len: int) -> tuple[float, list[int]]:
    """(seconds to the first token, the generated tokens) of one request served alone."""
    engine.add_request(request_id, prompt, SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True))
    start, first, tokens = time.perf_counter(), None, []
    while engine.has_unfinished():
        for out in engine.step():
            (choice,) = out.outputs
            if choice.error:
                raise LmcError(f"turn {request_id} failed: {choice.error}; raise --max-model-len or the KV cache size")
            if choice.token_ids and first is None:
                first = time.perf_counter() - start
            tokens.extend(choice.token_ids)
    return first, tokens


def run_prefix_bench(engine_config: EngineConfig, bench: PrefixBenchConfig,
                     dummy_quant: QuantConfig | None = None) -> dict:
    """TTFT of both turns, with prefix caching as engine_config says; warmed up on an unrelated prompt."""
    engine = LLMEngine(dataclasses.replace(engine_config, dummy_quant=dummy_quant, max_num_seqs=1))
    if bench.longest_prompt + bench.output_len > engine.model_runner.max_model_len:
        raise LmcError(f"the second turn needs {bench.longest_prompt + bench.output_len} tokens, beyond max_model_len "
                       f"{engine.model_runner.max_model_len}; raise --max-model-len or shorten --prefix-len")
    rng = random.Random(bench.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(engine.model_runner.vocab_size) for _ in range(n)]

    drive(engine, [tokens(bench.question_len * 4)], bench.output_len, 1)  # warm-up: compiles the prefill kernels
    turn1 = tokens(bench.prefix_len + bench.question_len)
    ttft1, answer = serve_turn(engine, "turn-1", turn1, bench.output_len)
    turn2 = turn1 + answer + tokens(bench.question_len)
    ttft2, _ = serve_turn(engine, "turn-2", turn2, bench.output_len)
    stats = engine.stats()
    return {
        "config": {**dataclasses.asdict(bench), "prefix_caching": engine_config.enable_prefix_caching},
        "turns": [{"prompt_len": len(turn1), "ttft_ms": 1e3 * ttft1}, {"prompt_len": len(turn2), "ttft_ms": 1e3 * ttft2}],
        "second_turn_speedup": ttft1 / ttft2,
        "prefix_cache": {"queries": stats.prefix_cache_queries, "hits": stats.prefix_cache_hits},
    }


def table_rows(result: dict) -> list[tuple[str, str]]:
    (first, second) = result["turns"]
    return [
        ("prefix caching", "on" if result["config"]["prefix_caching"] else "off"),
        ("turn 1 TTFT", f"{first['ttft_ms']:.1f} ms ({first['prompt_len']} prompt tokens)"),
        ("turn 2 TTFT", f"{second['ttft_ms']:.1f} ms ({second['prompt_len']} prompt tokens)"),
        ("turn 1 / turn 2", f"{result['second_turn_speedup']:.1f}x"),
        ("prefix cache hits / queries", f"{result['prefix_cache']['hits']} / {result['prefix_cache']['queries']}"),
    ]
