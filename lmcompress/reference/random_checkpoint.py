"""Tiny random-weight Hugging Face checkpoints of each supported family, for format and shape tests.

    make_random_checkpoint(tmp_path / "m", "qwen3", num_hidden_layers=1, max_shard_size="200KB")

Built with transformers' own config classes and `from_config`, so each family's
quirks are the real ones: Qwen2 has biases on q/k/v, Qwen3 has per-head RMSNorm on
q and k, Mistral a sliding-window setting.  Plain N(0, 0.02) weights quantize with
no outliers at all, which would let a broken AWQ pass its tests; so a few residual
channels get large norm weights in every layer, which gives the inputs of q/k/v and
gate/up the persistent outlier channels that real LLMs have.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from lmcompress import reference
from lmcompress.errors import LmcError
from lmcompress.reference.tokenizer import REFERENCE_VOCAB_SIZE, SPECIAL_TOKENS, byte_tokenizer

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Small, but with in_features divisible by 128 (group size) and grouped-query attention.
TINY_SHAPE = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "vocab_size": REFERENCE_VOCAB_SIZE,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
_NORMS_BEFORE_LINEARS = ("input_layernorm", "post_attention_layernorm")


def random_config(arch: str, **overrides) -> PretrainedConfig:
    """The tiny config of `arch`, with config fields overridden (e.g. num_hidden_layers=1)."""
    if arch not in CONFIG_CLASSES:
        raise LmcError(f"unknown arch {arch!r} for a random checkpoint; use one of {', '.join(CONFIG_CLASSES)}")
    fields = {**TINY_SHAPE, "bos_token_id": 0, "eos_token_id": 1, **overrides}
    return CONFIG_CLASSES[arch](**fields)


@torch.no_grad()
def add_outlier_channels(model: torch.nn.Module, channels: torch.Tensor, scale: float) -> None:
    """Multiply the given residual channels of every pre-linear RMSNorm weight by `scale`."""
    for layer in model.model.layers:
        for name in _NORMS_BEFORE_LINEARS:
            getattr(layer, name).weight[channels] *= scale


def _tokenizer_for(vocab_size: int):
    """The reference tokenizer when it fits the vocabulary, else bytes only."""
    if vocab_size >= REFERENCE_VOCAB_SIZE:
        return AutoTokenizer.from_pretrained(reference.REFERENCE_MODEL_DIR)
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise LmcError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer; use vocab_size >= 260")
    return byte_tokenizer()


def make_random_checkpoint(
    out_dir: str | Path,
    arch: str,
    *,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    max_shard_size: str | int = "1GB",
    outlier_channels: int = 4,
    outlier_scale: float = 20.0,
    **config_overrides,
) -> Path:
    """Write a random `arch` checkpoint (config, safetensors shards, tokenizer) to out_dir and return it.

    config_overrides are config fields such as hidden_size, intermediate_size,
    num_hidden_layers, num_key_value_heads or tie_word_embeddings.
    """
    config = random_config(arch, **config_overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    channels = torch.randperm(config.hidden_size, generator=generator)[:outlier_channels]
    add_outlier_channels(model, channels, outlier_scale)
    out_dir = Path(out_dir)
    model.to(dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
    _tokenizer_for(config.vocab_size).save_pretrained(out_dir)
    return out_dir
