"""RoPE against transformers' rotary embedding: default, linear and Llama 3.1 scaling, both config layouts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from lmcompress.errors import LmcError
from lmcompress.turbo.models.rope import RopeConfig, RotaryEmbedding, apply_rotary

HEAD_DIM = 32
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SCALINGS = {"default": None, "linear": {"rope_type": "linear", "factor": 4.0}, "llama3": LLAMA3}


def hf_config(scaling: dict | None) -> LlamaConfig:
    return LlamaConfig(hidden_size=4 * HEAD_DIM, num_attention_heads=4, max_position_embeddings=512,
                       rope_theta=50000.0, rope_scaling=scaling)


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_cos_sin_match_transformers(kind):
    config = hf_config(SCALINGS[kind])
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 511, 3])
    cos, sin = RotaryEmbedding(RopeConfig.from_hf(config.to_dict()), HEAD_DIM)(positions)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions[None])
    torch.testing.assert_close(cos, hf_cos[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0], atol=1e-6, rtol=0)
    if kind != "default":  # scaling changes something
        assert not torch.allclose(sin, RotaryEmbedding(RopeConfig(theta=50000.0), HEAD_DIM)(positions)[1])


def test_transformers4_config_layout_reads_the_same():
    v4 = {"rope_theta": 50000.0, "max_position_embeddings": 512,
          "rope_scaling": {"type": "llama3", **{k: v for k, v in LLAMA3.items() if k != "rope_type"}}}
    assert RopeConfig.from_hf(v4) == RopeConfig.from_hf(hf_config(LLAMA3).to_dict())
    assert RopeConfig.from_hf({}) == RopeConfig(original_max_position_embeddings=8192)


def test_apply_rotary_matches_transformers():
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(7) * 3
    cos, sin = RotaryEmbedding(RopeConfig(theta=10000.0), HEAD_DIM)(positions)
    q, k = torch.randn(7, 4, HEAD_DIM, generator=gen), torch.randn(7, 2, HEAD_DIM, generator=gen)
    # transformers wants [batch, heads, seq, dim]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    torch.testing.assert_close(apply_rotary(q, cos, sin), hf_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), hf_k[0].transpose(0, 1))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope type 'yarn'"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_rope_is_an_error(config, message):
    with pytest.raises(LmcError, match=message):
        RopeConfig.from_hf(config)
