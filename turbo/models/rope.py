"""Rotary position embeddings: inverse frequencies per rope type, and their application.

Supported rope types: "default", "linear" (positions divided by factor) and
"llama3" (Llama 3.1's frequency-dependent scaling).  config.json states them
either as `rope_theta` + `rope_scaling` (transformers 4) or as `rope_parameters`
(transformers 5); both are read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmcompress.errors import LmcError
from lmcompress.turbo import kernels

ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_THETA = 10000.0


@dataclass(frozen=True)
class RopeConfig:
    theta: float = DEFAULT_THETA
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf(cls, config: dict) -> RopeConfig:
        params = dict(config.get("rope_scaling") or {}) | dict(config.get("rope_parameters") or {})
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise LmcError(
                f"config.json asks for rope type {rope_type!r}, which turbo does not implement (it has "
                f"{', '.join(ROPE_TYPES)}); remove rope_scaling from config.json to serve within "
                "max_position_embeddings, or serve the model with transformers"
            )
        if float(params.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0)) != 1.0:
            raise LmcError(
                "config.json sets partial_rotary_factor, which turbo does not implement; serve the model with transformers"
            )
        return cls(
            theta=float(params.get("rope_theta", config.get("rope_theta", DEFAULT_THETA))),
            rope_type=rope_type,
            factor=float(params.get("factor", 1.0)),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", config.get("max_position_embeddings", 8192))
            ),
        )


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim / 2] float32: the angle per position of each rotated channel pair."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / rope.theta**exponents
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Long wavelengths (beyond the pretraining context / low_freq_factor) slow down by factor,
    short ones (below context / high_freq_factor) are kept, and the band between blends the two."""
    context = rope.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    slowed = inv_freq / rope.factor
    # 0 at the long-wavelength edge of the band, 1 at its short edge.
    blend = (context / wavelength - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - blend) * slowed + blend * inv_freq
    scaled = torch.where(wavelength > context / rope.low_freq_factor, slowed, inv_freq)
    in_band = (wavelength >= context / rope.high_freq_factor) & (wavelength <= context / rope.low_freq_factor)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", inverse_frequencies(rope, head_dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, head_dim] float32; both halves of head_dim share a frequency."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def rotate_query_key(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """apply_rotary to query [T, H, D] and key [T, Hkv, D]; on a kernel device in place, in one launch."""
    if kernels.available(query.device):
        from lmcompress.turbo.kernels.fused import rotary_

        rotary_(query, key, cos, sin)
        return query, key
    return apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by its tokens' angles; channel i pairs with i + head_dim / 2."""
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotated_half * sin
