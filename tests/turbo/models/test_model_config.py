"""Reading config.json into ModelConfig: family flags, head_dim, sliding windows and unsupported settings."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from lmcompress.errors import LmcError
from lmcompress.turbo.models.model_config import ModelConfig

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


@pytest.mark.parametrize(
    "config, flags",
    [
        (LlamaConfig(**TINY), (False, False, False, False)),
        (LlamaConfig(**TINY, attention_bias=True, mlp_bias=True), (True, True, True, False)),
        (MistralConfig(**TINY, sliding_window=None), (False, False, False, False)),
        (Qwen2Config(**TINY), (True, False, False, False)),
        (Qwen3Config(**TINY), (False, False, False, True)),
        (Qwen3Config(**TINY, attention_bias=True), (True, True, False, True)),
    ],
)
def test_family_flags(config, flags):
    parsed = ModelConfig.from_hf(config.to_dict())
    assert (parsed.qkv_bias, parsed.o_bias, parsed.mlp_bias, parsed.qk_norm) == flags
    assert (parsed.num_heads, parsed.num_kv_heads, parsed.num_layers) == (4, 2, 2)
    assert parsed.max_model_len == 256


def test_head_dim_from_config_or_hidden_size():
    assert ModelConfig.from_hf(Qwen3Config(**TINY, head_dim=48).to_dict()).head_dim == 48
    assert ModelConfig.from_hf(LlamaConfig(**TINY).to_dict()).head_dim == 16


def test_mistral_sliding_window_shorter_than_max_model_len_is_an_error():
    config = MistralConfig(**TINY, sliding_window=128).to_dict()
    with pytest.raises(LmcError, match="window of 128 tokens, shorter than max_model_len 256.*pass max_model_len <= 128"):
        ModelConfig.from_hf(config)
    assert ModelConfig.from_hf(config, max_model_len=128).max_model_len == 128


def test_qwen_sliding_window_counts_only_when_a_layer_uses_it():
    unused = Qwen2Config(**TINY, sliding_window=32, use_sliding_window=False).to_dict()
    assert ModelConfig.from_hf(unused).max_model_len == 256
    used = Qwen2Config(**TINY, sliding_window=32, use_sliding_window=True, max_window_layers=1).to_dict()
    with pytest.raises(LmcError, match="sliding attention window of 32"):
        ModelConfig.from_hf(used)
    # A transformers 4 config.json has no layer_types.
    v4 = {k: v for k, v in used.items() if k != "layer_types"}
    with pytest.raises(LmcError, match="sliding attention window of 32"):
        ModelConfig.from_hf(v4)
    assert ModelConfig.from_hf(v4 | {"max_window_layers": 2}).max_model_len == 256


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "4 attention heads and 3 KV heads"),
        ({"model_type": "gpt2"}, "unsupported architecture"),
        ({"max_position_embeddings": None}, "no max_position_embeddings; pass max_model_len"),
    ],
)
def test_unsupported_configs_are_errors(change, message):
    with pytest.raises(LmcError, match=message):
        ModelConfig.from_hf(LlamaConfig(**TINY).to_dict() | change)
