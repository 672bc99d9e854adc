"""What a quantization method sees of one decoder layer during calibration.

The calibration pipeline builds one Hugging Face decoder layer at a time on the
compute device, feeds it the hidden states that the previous (already
quantized) layers produced, and hands a LayerContext to the method.  A method
returns a QTensor per linear and may change the layer's float parameters in
place (AWQ folds scales into norms and linears; GPTQ writes back the
dequantized weights): the pipeline computes the next layer's inputs with the
layer as the method leaves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lmcompress.arch import ArchSpec
from lmcompress.quant.qtensor import QTensor, QuantConfig

# Forward passes over the calibration set run this many samples at a time, which
# bounds the activations of a wide MLP (70B: 32 x 512 x 28672 floats = 1.9 GB).
SAMPLES_PER_FORWARD = 32


@dataclass
class LayerContext:
    layer: nn.Module  # one HF decoder layer (LlamaDecoderLayer, Qwen3DecoderLayer, ...), float32
    inputs: torch.Tensor  # [n_samples, seq_len, hidden] hidden states entering the layer
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each [1, seq_len, head_dim]
    spec: ArchSpec
    cfg: QuantConfig
    name: str  # e.g. "model.layers.3", for messages

    def module(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def linear(self, name: str) -> nn.Linear:
        return self.layer.get_submodule(name)

    def call_submodule(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Run submodule `name` (e.g. 'self_attn', 'mlp', 'mlp.down_proj') on x [n, seq, features]."""
        module = self.module(name)
        if name == "self_attn":
            out = module(hidden_states=x, position_embeddings=self.position_embeddings, attention_mask=None)
        else:
            out = module(x)
        return out[0] if isinstance(out, tuple) else out

    def call_layer(self, x: torch.Tensor) -> torch.Tensor:
        """The whole decoder layer on x [n, seq, hidden] (causal attention, no padding)."""
        out = self.layer(x, attention_mask=None, position_embeddings=self.position_embeddings)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def batched(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """fn over x [n, ...] in chunks of SAMPLES_PER_FORWARD samples, concatenated."""
        return torch.cat([fn(chunk) for chunk in x.split(SAMPLES_PER_FORWARD)])

    @torch.no_grad()
    def feed_inputs(
        self,
        linear_names: list[str],
        consume: Callable[[str, torch.Tensor], None],
        x: torch.Tensor | None = None,
    ) -> None:
        """One layer forward on x (default: self.inputs), SAMPLES_PER_FORWARD samples at a time, handing
        each named linear's input chunk [chunk, seq, in_features] to consume(name, chunk) as it happens.

        Nothing is kept, so statistics (GPTQ's Hessians) can be accumulated without storing all inputs.
        """
        hooks = [
            self.linear(name).register_forward_hook(lambda _m, args, _out, name=name: consume(name, args[0]))
            for name in linear_names
        ]
        try:
            for chunk in (self.inputs if x is None else x).split(SAMPLES_PER_FORWARD):
                self.call_layer(chunk)
        finally:
            for hook in hooks:
                hook.remove()

    def capture_inputs(self, linear_names: list[str], x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Inputs of the named linears, [n, seq, in_features] each, from one layer forward on x (default: self.inputs)."""
        captured: dict[str, list[torch.Tensor]] = {name: [] for name in linear_names}
        self.feed_inputs(linear_names, lambda name, chunk: captured[name].append(chunk), x)
        return {name: torch.cat(chunks) for name, chunks in captured.items()}


# A method: (context, options) -> {linear name relative to the layer: QTensor}
QuantMethod = Callable[..., dict[str, QTensor]]
