"""The decoder's shape and family features, read from a Hugging Face config.json.

One generic decoder serves Llama, Mistral, Qwen2 and Qwen3; the families differ
only in the flags here: Qwen2 always has q/k/v biases, Qwen3 normalises q and k
per head, Llama may set attention_bias / mlp_bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcompress.arch import ArchSpec, arch_for
from lmcompress.errors import LmcError
from lmcompress.turbo.models.rope import RopeConfig

# config.json dtype names of the float types turbo computes in.
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelConfig:
    arch: ArchSpec
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_model_len: int
    checkpoint_dtype: torch.dtype | None  # the dtype config.json declares, if a float one

    @classmethod
    def from_hf(cls, config: dict, max_model_len: int | None = None) -> ModelConfig:
        """Parse config.json; max_model_len defaults to max_position_embeddings."""
        arch = arch_for(config)
        _check_activation(config)
        num_heads = int(config["num_attention_heads"])
        num_kv_heads = int(config.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise LmcError(
                f"config.json has {num_heads} attention heads and {num_kv_heads} KV heads; "
                "num_attention_heads must be a multiple of num_key_value_heads, restore the original config.json"
            )
        max_len = int(max_model_len or config.get("max_position_embeddings") or 0)
        if max_len < 1:
            raise LmcError("config.json has no max_position_embeddings; pass max_model_len")
        _check_sliding_window(config, max_len)
        attention_bias = bool(config.get("attention_bias", False))
        qwen2 = arch.name == "qwen2"
        return cls(
            arch=arch,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // num_heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf(config),
            qkv_bias=qwen2 or attention_bias,
            o_bias=not qwen2 and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=arch.name == "qwen3",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_model_len=max_len,
            checkpoint_dtype=TORCH_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype"))),
        )


def _check_activation(config: dict) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise LmcError(
            f"config.json sets hidden_act {act!r}; turbo's gated MLP implements silu only, serve the model with transformers"
        )


def _sliding_window(config: dict) -> int | None:
    """The attention window some layer uses, or None when every layer attends to the full context.

    Mistral applies sliding_window whenever it is set; Qwen2/Qwen3 only on the
    layers marked "sliding_attention" (transformers 5), i.e. with
    use_sliding_window from layer max_window_layers on (transformers 4).
    """
    window = config.get("sliding_window")
    if window is None:
        return None
    if config.get("model_type") == "mistral":
        return int(window)
    if "layer_types" in config:
        return int(window) if "sliding_attention" in config["layer_types"] else None
    first_sliding_layer = int(config.get("max_window_layers", 0))
    slides = config.get("use_sliding_window") and first_sliding_layer < int(config["num_hidden_layers"])
    return int(window) if slides else None


def _check_sliding_window(config: dict, max_model_len: int) -> None:
    window = _sliding_window(config)
    if window is not None and window < max_model_len:
        raise LmcError(
            f"config.json sets a sliding attention window of {window} tokens, shorter than max_model_len "
            f"{max_model_len}, and turbo attends to the full context; pass max_model_len <= {window}"
        )
