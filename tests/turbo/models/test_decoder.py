"""The generic decoder: RMSNorm against transformers, family-specific modules, tied heads, KV writes.

Its logits are compared with transformers for all four families in tests/turbo/test_model_runner.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec
from lmcompress.turbo.models.decoder import Decoder, RMSNorm
from lmcompress.turbo.models.model_config import ModelConfig
from lmcompress.turbo.models.weights import DummyWeights

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
BLOCK = 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, generator=gen).to(dtype)
    x = (torch.randn(5, 64, generator=gen) * 3).to(dtype)
    reference = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    reference.weight.data.copy_(weight)
    torch.testing.assert_close(RMSNorm(weight, 1e-5)(x), reference(x))


def dummy_decoder(hf_config) -> Decoder:
    config = ModelConfig.from_hf(hf_config.to_dict())
    return Decoder(config, DummyWeights(torch.float32, torch.device("cpu"), seed=0), torch.float32)


def test_family_modules_follow_the_config():
    qwen3 = dummy_decoder(Qwen3Config(**TINY, tie_word_embeddings=True))
    attention = qwen3.layers[0].self_attn
    assert attention.q_norm is not None and attention.q_norm.weight.shape == (qwen3.config.head_dim,)
    assert attention.qkv_proj.bias is None
    # Tied head: the embedding matrix held once.
    assert qwen3.lm_head.weight.data_ptr() == qwen3.embed_tokens.data_ptr()

    qwen2 = dummy_decoder(Qwen2Config(**TINY, tie_word_embeddings=False))
    attention = qwen2.layers[1].self_attn
    assert attention.q_norm is None
    # q/k/v biases stacked in one linear: 4 query heads + 2 key + 2 value heads of 16
    assert attention.qkv_proj.bias.shape == (128,) and attention.o_proj.bias is None
    assert qwen2.lm_head.weight.data_ptr() != qwen2.embed_tokens.data_ptr()


def test_forward_writes_each_new_token_to_its_slot_in_every_layer():
    decoder = dummy_decoder(Qwen3Config(**TINY))
    config = decoder.config
    spec = KVCacheSpec(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       block_size=BLOCK, dtype="float32")
    cache = KVCache(spec, num_blocks=8)
    batch = ForwardBatch.build([SeqInput([1, 2, 3, 4, 5], 0, [6, 2]), SeqInput([9], 2, [4])], BLOCK)
    logits = decoder(batch, cache)
    assert logits.shape == (2, 64) and logits.dtype == torch.float32
    written = {24, 25, 26, 27, 8, 18}
    for layer in cache.layers:
        used = set(layer.keys.data.flatten(1).abs().sum(dim=1).nonzero().flatten().tolist())
        assert used == written
