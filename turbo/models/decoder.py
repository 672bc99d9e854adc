"""One decoder-only transformer for all supported families, over a packed, paged batch.

Per layer (pre-norm residual blocks, as in Llama):
    n = input_layernorm(h)
    h = h + o_proj(attention(rope(qk_norm(q_proj(n))), rope(qk_norm(k_proj(n))), v_proj(n)))
    n = post_attention_layernorm(h)
    h = h + down_proj(silu(gate_proj(n)) * up_proj(n))
Optional pieces (q/k/v and o biases, per-head q/k RMSNorm) are switched on by ModelConfig.
Linears that read the same input run as one: q/k/v as qkv_proj, gate/up as gate_up_proj
(one GEMM, one launch and one read of the activations instead of three or two).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmcompress.turbo.attention import paged_attention
from lmcompress.turbo.forward_batch import ForwardBatch
from lmcompress.turbo.kv_cache import KVCache, LayerKVCache
from lmcompress.quant.qtensor import QTensor, concat_out_features
from lmcompress.turbo import kernels
from lmcompress.turbo.models.linear import make_linear
from lmcompress.turbo.models.model_config import ModelConfig
from lmcompress.turbo.models.rope import RotaryEmbedding, rotate_query_key
from lmcompress.turbo.models.weights import WeightSource


class RMSNorm(nn.Module):
    """RMSNorm, optionally fused with the residual add before it (one Triton kernel on CUDA)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.register_buffer("weight", weight)  # [dim]
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [..., dim] -> norm(x); with residual: (norm(x + residual), x + residual)."""
        if kernels.available(x.device):
            from lmcompress.turbo.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_reference(x, self.weight, self.eps, residual)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., D], weight [D] -> normed [..., D]; with residual: (normed(x + residual), x + residual).

    Normalise in float32, scale in the model dtype (transformers' order of operations); the oracle
    of the fused Triton kernel.
    """
    if residual is not None:
        hidden = x + residual
        return rms_norm_reference(hidden, weight, eps), hidden
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * intermediate] (gate, then up) -> silu(gate) * up [T, intermediate]."""
    if kernels.available(gate_up.device):
        from lmcompress.turbo.kernels.fused import silu_and_mul as fused_silu_and_mul

        return fused_silu_and_mul(gate_up)
    return silu_and_mul_reference(gate_up)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2I] (gate then up) -> silu(gate) * up [..., I]: the oracle of the fused Triton kernel."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class _Loader:
    """Builds modules from a WeightSource by Hugging Face tensor names."""

    def __init__(self, config: ModelConfig, weights: WeightSource, dtype: torch.dtype, dequantize: bool):
        self.config = config
        self.weights = weights
        self.dtype = dtype
        self.dequantize = dequantize

    def linear(self, prefix: str, out_features: int, in_features: int, bias: bool) -> nn.Module:
        return self.stacked_linear([prefix], [out_features], in_features, bias)

    def stacked_linear(self, prefixes: list[str], out_features: list[int], in_features: int, bias: bool) -> nn.Module:
        """One linear computing the named linears' outputs side by side: [T, in] -> [T, sum(out_features)]."""
        weights = [self.weights.linear(p, out, in_features) for p, out in zip(prefixes, out_features)]
        biases = [self.weights.tensor(f"{p}.bias", (out,)) for p, out in zip(prefixes, out_features)] if bias else None
        return make_linear(_stack(weights), None if biases is None else torch.cat(biases), self.dtype, self.dequantize)

    def norm(self, name: str, dim: int) -> RMSNorm:
        return RMSNorm(self.weights.norm(f"{name}.weight", dim).to(self.dtype), self.config.rms_norm_eps)


def _stack(weights: list[QTensor | torch.Tensor]) -> QTensor | torch.Tensor:
    """Concatenate along out_features: float weights, or QTensors sharing their grouping."""
    if len(weights) == 1:
        return weights[0]
    if all(isinstance(w, QTensor) for w in weights):
        return concat_out_features(weights)
    # A mix (a checkpoint that left some of them unquantized) runs in float.
    return torch.cat([w.dequantize(torch.float32) if isinstance(w, QTensor) else w.float() for w in weights])


class Attention(nn.Module):
    def __init__(self, load: _Loader, prefix: str):
        super().__init__()
        c = load.config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.widths = [q_width, kv_width, kv_width]
        self.qkv_proj = load.stacked_linear([f"{prefix}{n}_proj" for n in "qkv"], self.widths, c.hidden_size, c.qkv_bias)
        self.o_proj = load.linear(f"{prefix}o_proj", c.hidden_size, q_width, c.o_bias)
        self.q_norm = load.norm(f"{prefix}q_norm", c.head_dim) if c.qk_norm else None
        self.k_norm = load.norm(f"{prefix}k_norm", c.head_dim) if c.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], cache: LayerKVCache,
                batch: ForwardBatch) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes the new tokens' K/V to the cache first."""
        num_tokens = x.shape[0]
        query, key, value = self.qkv_proj(x).split(self.widths, dim=-1)
        query = query.reshape(num_tokens, self.num_heads, self.head_dim)
        key = key.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = rotate_query_key(query, key, *rope)
        cache.write(batch.slot_mapping, key, value)
        out = paged_attention(query, cache, batch, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    def __init__(self, load: _Loader, prefix: str):
        super().__init__()
        c = load.config
        self.gate_up_proj = load.stacked_linear([f"{prefix}gate_proj", f"{prefix}up_proj"],
                                                [c.intermediate_size] * 2, c.hidden_size, c.mlp_bias)
        self.down_proj = load.linear(f"{prefix}down_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, load: _Loader, index: int):
        super().__init__()
        prefix = load.config.arch.layer_prefix(index)
        hidden = load.config.hidden_size
        self.input_layernorm = load.norm(f"{prefix}input_layernorm", hidden)
        self.self_attn = Attention(load, f"{prefix}self_attn.")
        self.post_attention_layernorm = load.norm(f"{prefix}post_attention_layernorm", hidden)
        self.mlp = GatedMLP(load, f"{prefix}mlp.")

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: tuple[torch.Tensor, torch.Tensor],
                cache: LayerKVCache, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) [T, hidden] each -> the next layer's (h, residual); their sum is the hidden state.

        Carrying the residual separately lets each norm fuse the add before it.
        """
        if residual is None:
            normed, residual = self.input_layernorm(h), h
        else:
            normed, residual = self.input_layernorm(h, residual)
        h = self.self_attn(normed, rope, cache, batch)
        normed, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(normed), residual


class Decoder(nn.Module):
    """Embedding, decoder layers, final norm and LM head, built from `weights` in `dtype`.

    dequantize: turn 4-bit linears into float ones at load (faster on the CPU,
    without the memory saving).
    """

    def __init__(self, config: ModelConfig, weights: WeightSource, dtype: torch.dtype, dequantize: bool = False):
        super().__init__()
        self.config = config
        arch = config.arch
        load = _Loader(config, weights, dtype, dequantize)
        embed = weights.tensor(f"{arch.embed}.weight", (config.vocab_size, config.hidden_size)).to(dtype)
        self.register_buffer("embed_tokens", embed)  # [vocab, hidden]
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)
        self.layers = nn.ModuleList(DecoderLayer(load, i) for i in range(config.num_layers))
        self.norm = load.norm(arch.final_norm, config.hidden_size)
        self.lm_head = (
            make_linear(embed, None, dtype) if config.tie_word_embeddings
            else load.linear(arch.lm_head, config.vocab_size, config.hidden_size, bias=False)
        )

    def forward(self, batch: ForwardBatch, cache: KVCache) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] float32; writes every new token's K/V to the cache."""
        h = F.embedding(batch.input_ids, self.embed_tokens)  # [T, hidden]
        rope = self.rotary(batch.positions)
        residual = None
        for layer, layer_cache in zip(self.layers, cache.layers):
            h, residual = layer(h, residual, rope, layer_cache, batch)
        # Norm and LM head only for the rows whose logits are wanted.
        rows = batch.logits_indices
        normed, _ = self.norm(h[rows], residual[rows])
        return self.lm_head(normed).float()
