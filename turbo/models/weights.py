"""Where the decoder's tensors come from: a checkpoint directory, or random numbers (dummy mode).

Both sources answer the same three questions by Hugging Face tensor name, so the
decoder is built by one code path whatever the source.  Tensors are created on
the target device one at a time.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lmcompress.checkpoint import Checkpoint
from lmcompress.errors import LmcError
from lmcompress.formats.loader import detect_format, read_linear
from lmcompress.quant.qtensor import QTensor, QuantConfig

# Standard deviation of dummy float weights (transformers' initializer_range default).
DUMMY_STD = 0.02


class WeightSource(Protocol):
    def linear(self, prefix: str, out_features: int, in_features: int) -> QTensor | torch.Tensor:
        """The weight of linear `prefix` (e.g. model.layers.0.mlp.up_proj): a QTensor or a float [out, in]."""

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float tensor (embedding, bias) by full name."""

    def norm(self, name: str, dim: int) -> torch.Tensor:
        """An RMSNorm weight [dim] by full name."""


class CheckpointWeights:
    """Tensors of a Hugging Face checkpoint: float, lmc/AutoAWQ AWQ or GPTQ v1 (via lmcompress.formats.loader)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
        self.ckpt = ckpt
        self.format = detect_format(ckpt)
        self.dtype = dtype
        self.device = device

    def linear(self, prefix: str, out_features: int, in_features: int) -> QTensor | torch.Tensor:
        weight = read_linear(self.ckpt, prefix, self.format)  # checks the shape against config.json
        if isinstance(weight, QTensor):
            return _qtensor_to(weight, self.device)
        return weight.to(self.device, self.dtype)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.ckpt.get(name)
        if tuple(tensor.shape) != tuple(shape):
            raise LmcError(
                f"{name} in {self.ckpt.path} has shape {list(tensor.shape)} but config.json implies {list(shape)}; "
                "restore the config.json written with these weights"
            )
        return tensor.to(self.device, self.dtype)

    def norm(self, name: str, dim: int) -> torch.Tensor:
        return self.tensor(name, (dim,))


class DummyWeights:
    """Random weights for benchmarks: normal(0, 0.02) floats, unit norms, and with `quant`
    random 4-bit codes whose dequantized values have about the same spread."""

    def __init__(self, dtype: torch.dtype, device: torch.device, quant: QuantConfig | None = None, seed: int = 0):
        self.dtype = dtype
        self.device = device
        self.quant = quant
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def linear(self, prefix: str, out_features: int, in_features: int) -> QTensor | torch.Tensor:
        if self.quant is None:
            return self.tensor(prefix, (out_features, in_features))
        self.quant.check_divides(prefix, in_features)
        groups = in_features // self.quant.group_size
        levels = self.quant.max_code + 1
        # Uniform codes around the zero point have std ~ levels / sqrt(12) steps.
        step = DUMMY_STD * 12**0.5 / levels
        return QTensor(
            q=self._codes((out_features, in_features), levels),
            scales=torch.full((out_features, groups), step, dtype=self.dtype, device=self.device),
            zeros=torch.full((out_features, groups), levels // 2, dtype=torch.uint8, device=self.device),
            bits=self.quant.bits,
            group_size=self.quant.group_size,
        )

    def _codes(self, shape: tuple[int, int], levels: int) -> torch.Tensor:
        return torch.randint(0, levels, shape, generator=self.generator, dtype=torch.uint8, device=self.device)

    def tensor(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=self.dtype, device=self.device) * DUMMY_STD

    def norm(self, name: str, dim: int) -> torch.Tensor:
        return torch.ones(dim, dtype=self.dtype, device=self.device)


def _qtensor_to(qt: QTensor, device: torch.device) -> QTensor:
    g_idx = None if qt.g_idx is None else qt.g_idx.to(device)
    return QTensor(qt.q.to(device), qt.scales.to(device), qt.zeros.to(device), qt.bits, qt.group_size, g_idx)
