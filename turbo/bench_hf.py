"""The Hugging Face transformers baseline behind `lmc bench hf`: `generate()` on one static batch.

B prompts of I random token ids (fixed seed) generate exactly O tokens each (greedy,
min_new_tokens = max_new_tokens, so EOS never stops a row early).  With cache "static",
generate() preallocates the KV cache and, on CUDA, compiles its decoding step itself
(torch.compile), which is the fastest stock transformers path; "dynamic" is its default
eager path.  A warmup call of the same shapes (which pays that compilation) runs first and
is timed separately; the timed call is bracketed by device synchronisation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from lmcompress.errors import LmcError
from lmcompress.resources import PeakMemory

CACHES = ("static", "dynamic")


@dataclass(frozen=True)
class HFBenchConfig:
    batch_size: int
    input_len: int
    output_len: int
    cache: str = "static"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "input_len", "output_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmcError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}; pass one")
        if self.cache not in CACHES:
            raise LmcError(f"--cache must be one of {', '.join(CACHES)}, got {self.cache!r}; pass one of those")


def load_hf_model(model_dir: str | Path, dummy: bool, dtype: torch.dtype, device: torch.device,
                  seed: int = 0) -> PreTrainedModel:
    """The checkpoint's model, or with `dummy` one of random weights built on the device from config.json."""
    if not (Path(model_dir) / "config.json").is_file():
        raise LmcError(f"{model_dir} has no config.json; pass a Hugging Face model directory")
    if dummy:
        torch.manual_seed(seed)
        with device:  # initialise the weights where they will run: a 7B model on the CPU takes minutes
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return model.eval()


def random_input_ids(config: HFBenchConfig, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, I] long, uniform over the vocabulary, the same for a given seed."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randint(0, vocab_size, (config.batch_size, config.input_len), generator=generator).to(device)


def _generation_config(model: PreTrainedModel, config: HFBenchConfig) -> GenerationConfig:
    eos = model.generation_config.eos_token_id
    pad = model.generation_config.pad_token_id
    return GenerationConfig(
        max_new_tokens=config.output_len, min_new_tokens=config.output_len, do_sample=False,
        cache_implementation="static" if config.cache == "static" else None,
        eos_token_id=eos, pad_token_id=pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
    )


def _timed_generate(model: PreTrainedModel, input_ids: torch.Tensor, generation: GenerationConfig) -> float:
    _synchronize(input_ids.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=generation)
    _synchronize(input_ids.device)
    elapsed = time.perf_counter() - start
    new_tokens = out.shape[1] - input_ids.shape[1]
    if new_tokens != generation.max_new_tokens:
        raise LmcError(f"generate() made {new_tokens} tokens per row instead of {generation.max_new_tokens}; "
                       "the model's max_position_embeddings may be too small: shorten --input-len/--output-len")
    return elapsed


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_hf_bench(model: PreTrainedModel, config: HFBenchConfig) -> dict:
    """Warm up, then time one generate() of the batch; the figures as a dict."""
    device = model.device
    input_ids = random_input_ids(config, model.config.get_text_config().vocab_size, device)
    generation = _generation_config(model, config)
    with PeakMemory(device) as peak:
        warmup_s = _timed_generate(model, input_ids, generation)
        elapsed = _timed_generate(model, input_ids, generation)
    output_tokens = config.batch_size * config.output_len
    input_tokens = config.batch_size * config.input_len
    return {
        "config": {**asdict(config), "dtype": str(model.dtype).removeprefix("torch.")},
        "setup": {"device": str(device), "warmup_s": warmup_s},
        "memory": {"weight_bytes": sum(p.nbytes for p in model.parameters()), "peak_bytes": peak.bytes,
                   "peak_kind": peak.kind},
        "throughput": {"completed": config.batch_size, "elapsed_s": elapsed, "input_tokens": input_tokens,
                       "output_tokens": output_tokens, "output_tok_s": output_tokens / elapsed,
                       "total_tok_s": (input_tokens + output_tokens) / elapsed,
                       "request_s": config.batch_size / elapsed},
    }


def table_rows(result: dict) -> list[tuple[str, str]]:
    config, setup, t, mem = result["config"], result["setup"], result["throughput"], result["memory"]
    return [
        ("Device", setup["device"]),
        ("Batch", f"{config['batch_size']} x ({config['input_len']} in, {config['output_len']} out), "
                  f"{config['dtype']}, {config['cache']} cache"),
        ("Warmup (s)", f"{setup['warmup_s']:.2f}"),
        ("Elapsed (s)", f"{t['elapsed_s']:.3f}"),
        ("Output tok/s", f"{t['output_tok_s']:.1f}"),
        ("Total tok/s", f"{t['total_tok_s']:.1f}"),
        ("Requests/s", f"{t['request_s']:.3f}"),
        ("Weights (MiB)", f"{mem['weight_bytes'] / 2**20:.1f}"),
        (f"Peak memory (MiB, {mem['peak_kind']})", f"{mem['peak_bytes'] / 2**20:.1f}"),
    ]
