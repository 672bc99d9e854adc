"""Tiny Hugging Face decoder layers with activation outliers, wrapped as LayerContexts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding

from lmcompress.arch import ARCHS
from lmcompress.quant.layer import LayerContext
from lmcompress.quant.qtensor import QuantConfig

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, SEQ = 128, 256, 4, 32, 32
# Real checkpoints have a few norm channels far larger than the rest; they produce
# the activation outliers that AWQ protects and RTN ignores.
OUTLIER_CHANNELS = [5, 37, 70, 122]
OUTLIER_GAIN = 8.0

_FAMILIES = {
    "llama": (LlamaConfig, LlamaDecoderLayer, LlamaRotaryEmbedding),
    "qwen2": (Qwen2Config, Qwen2DecoderLayer, Qwen2RotaryEmbedding),
    "qwen3": (Qwen3Config, Qwen3DecoderLayer, Qwen3RotaryEmbedding),
}


@dataclass
class TinyLayerCase:
    ctx: LayerContext
    held_out: torch.Tensor  # [n, SEQ, HIDDEN] inputs not used for calibration
    reference: torch.Tensor  # the float layer's outputs on held_out

    def held_out_mse(self) -> float:
        """MSE of the layer as it is now against the float layer, on the held-out inputs."""
        return (self.ctx.batched(self.ctx.call_layer, self.held_out) - self.reference).pow(2).mean().item()


def make_tiny_case(
    arch: str = "llama",
    kv_heads: int = HEADS,
    group_size: int = 32,
    sym: bool = False,
    n_calib: int = 16,
    seed: int = 0,
) -> TinyLayerCase:
    config_cls, layer_cls, rotary_cls = _FAMILIES[arch]
    config = config_cls(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        head_dim=HEAD_DIM,
        num_hidden_layers=1,
    )
    # sdpa is causal when attention_mask is None, which is how the pipeline runs a layer
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    layer = layer_cls(config, layer_idx=0).float().eval()
    with torch.no_grad():
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.uniform_(0.5, 1.5)
            norm.weight[OUTLIER_CHANNELS] = OUTLIER_GAIN
    # Hidden states of real models are strongly correlated across channels (which GPTQ exploits):
    # mix iid noise through a random basis with a decaying spectrum.
    basis = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN))[0]
    mixing = basis * torch.logspace(0, -1.5, HIDDEN)
    inputs = torch.randn(n_calib, SEQ, HIDDEN) @ mixing.T
    held_out = torch.randn(8, SEQ, HIDDEN) @ mixing.T
    position_embeddings = rotary_cls(config)(inputs, torch.arange(SEQ)[None])
    ctx = LayerContext(
        layer=layer,
        inputs=inputs,
        position_embeddings=position_embeddings,
        spec=ARCHS[arch],
        cfg=QuantConfig(bits=4, group_size=group_size, sym=sym),
        name="model.layers.0",
    )
    return TinyLayerCase(ctx, held_out, ctx.batched(ctx.call_layer, held_out))


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs tiny models (tests/conftest.py).  Module scope, so that it is in force before each
    module's own module-scoped fixtures run (pytest sets up wider scopes first, whatever asks for them)."""


@pytest.fixture
def tiny_case() -> Callable[..., TinyLayerCase]:
    """Factory: tiny_case(arch="llama", kv_heads=4, group_size=32, sym=False, n_calib=16, seed=0)."""
    return make_tiny_case
