"""The turbo engine's options, shared by `lmc serve`, `lmc chat` and `lmc generate`.

Option names are EngineConfig's field names (plus --kv-cache-memory, a size string
for kv_cache_bytes) and defaults come from EngineConfig itself, so the CLI and the
library never disagree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import click

from lmcompress.cli.options import device_option, parse_size
from lmcompress.turbo.config import KV_QUANT_MODES, EngineConfig

_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig) if f.default is not dataclasses.MISSING}

_OPTIONS = (
    device_option,
    click.option("--tokenizer", type=click.Path(exists=True, file_okay=False), default=None,
                 help="Tokenizer directory, when the model directory has none."),
    click.option("--dtype", default=_DEFAULTS["dtype"], show_default=True,
                 help="Compute dtype: auto (float32 on the CPU, the checkpoint's on CUDA), float16, bfloat16 "
                      "or float32."),
    click.option("--kv-cache-dtype", default=_DEFAULTS["kv_cache_dtype"], show_default=True,
                 help="KV-cache dtype: auto (= --dtype), float16, bfloat16, float32, int8 or int4."),
    click.option("--kv-quant", type=click.Choice(KV_QUANT_MODES), default=_DEFAULTS["kv_quant"], show_default=True,
                 help="int8/int4 KV scales: dynamic (per token and head, online) or static (the checkpoint's "
                      "kv_cache_scales.json)."),
    click.option("--block-size", type=int, default=_DEFAULTS["block_size"], show_default=True,
                 help="Tokens per KV-cache block."),
    click.option("--gpu-memory-utilization", type=float, default=_DEFAULTS["gpu_memory_utilization"],
                 show_default=True, help="On CUDA: fraction of the memory free after loading the weights "
                                         "that the KV cache takes."),
    click.option("--kv-cache-memory", default=None,
                 help="KV-cache size, e.g. 4GiB; overrides --gpu-memory-utilization (CPU default: 2GiB)."),
    click.option("--num-kv-blocks", type=int, default=None, help="KV-cache size in blocks; overrides both."),
    click.option("--max-num-seqs", type=int, default=_DEFAULTS["max_num_seqs"], show_default=True,
                 help="Most sequences running at once."),
    click.option("--max-num-batched-tokens", type=int, default=_DEFAULTS["max_num_batched_tokens"],
                 show_default=True, help="Token budget of one forward pass (longer prompts are chunked)."),
    click.option("--max-model-len", type=int, default=None,
                 help="Longest prompt + output; default: the model's max_position_embeddings."),
    click.option("--enable-prefix-caching/--disable-prefix-caching", default=_DEFAULTS["enable_prefix_caching"],
                 show_default=True, help="Reuse the KV of shared prompt prefixes across requests."),
    click.option("--enforce-eager", is_flag=True, default=_DEFAULTS["enforce_eager"],
                 help="On CUDA, run decode steps eagerly instead of replaying captured CUDA graphs."),
    click.option("--seed", type=int, default=None, help="Seed of the random stream of unseeded requests."),
)


def engine_options(command: Callable) -> Callable:
    """Add every engine option to a click command whose first parameter is MODEL_DIR.

    The command is called as command(config, **its_own_options), with the
    EngineConfig built from MODEL_DIR and the engine options.
    """
    @functools.wraps(command)
    def with_config(model_dir: str, kv_cache_memory: str | None, **options):
        engine = {name: options.pop(name) for name in list(options) if name in _ENGINE_FIELDS}
        kv_cache_bytes = parse_size(kv_cache_memory) if kv_cache_memory is not None else None
        return command(EngineConfig(model=model_dir, kv_cache_bytes=kv_cache_bytes, **engine), **options)

    for option in reversed(_OPTIONS):
        with_config = option(with_config)
    return with_config
