"""KV-cache calibration: per-layer, per-KV-head ranges of K (after RoPE) and V.

The runtime's static KV quantization reads the tables this module writes.
File `kv_cache_scales.json` in the quantized checkpoint directory:

    {
      "format": "lmc-kv-cache-scales", "version": 1,
      "num_layers": L, "num_kv_heads": H, "head_dim": D,
      "key_after_rope": true,
      "ranges": {"k_min": [[H floats] x L], "k_max": ..., "v_min": ..., "v_max": ...},
      "int8": {"k_scale": [[H] x L], "k_zero": ..., "v_scale": ..., "v_zero": ...},
      "int4": {...same keys...}
    }

Quantization is asymmetric per (layer, head), LMDeploy's convention:
    scale = (max - min) / (2**bits - 1),  zero = min,
    q = clamp(round((x - zero) / scale), 0, 2**bits - 1),  x ~= q * scale + zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmcompress.errors import LmcError

KV_SCALES_FILE = "kv_cache_scales.json"
KV_BITS = (8, 4)
_MIN_SCALE = 1e-8


@dataclass
class KVRangeRecorder:
    """Running per-head min/max of K and V over calibration batches, for one model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    # each [num_layers, num_kv_heads]
    k_min: torch.Tensor = field(init=False)
    k_max: torch.Tensor = field(init=False)
    v_min: torch.Tensor = field(init=False)
    v_max: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        shape = (self.num_layers, self.num_kv_heads)
        self.k_min = torch.full(shape, float("inf"))
        self.v_min = torch.full(shape, float("inf"))
        self.k_max = torch.full(shape, float("-inf"))
        self.v_max = torch.full(shape, float("-inf"))

    def observe(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """key, value: [batch, num_kv_heads, seq, head_dim], key after RoPE."""
        self._update(self.k_min, self.k_max, layer, key)
        self._update(self.v_min, self.v_max, layer, value)

    @staticmethod
    def _update(lo: torch.Tensor, hi: torch.Tensor, layer: int, x: torch.Tensor) -> None:
        per_head = x.detach().float().transpose(0, 1).flatten(1)  # [heads, batch*seq*head_dim]
        lo[layer] = torch.minimum(lo[layer], per_head.amin(dim=1).cpu())
        hi[layer] = torch.maximum(hi[layer], per_head.amax(dim=1).cpu())

    def tables(self, bits: int) -> dict[str, torch.Tensor]:
        levels = 2**bits - 1
        return {
            "k_scale": ((self.k_max - self.k_min) / levels).clamp(min=_MIN_SCALE),
            "k_zero": self.k_min.clone(),
            "v_scale": ((self.v_max - self.v_min) / levels).clamp(min=_MIN_SCALE),
            "v_zero": self.v_min.clone(),
        }

    def to_json(self) -> dict:
        if not torch.isfinite(self.k_min).all():
            raise LmcError("KV ranges were not recorded for every layer; the calibration pass did not finish")
        return {
            "format": "lmc-kv-cache-scales",
            "version": 1,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "key_after_rope": True,
            "ranges": {k: getattr(self, k).tolist() for k in ("k_min", "k_max", "v_min", "v_max")},
            **{f"int{bits}": {k: v.tolist() for k, v in self.tables(bits).items()} for bits in KV_BITS},
        }

    def save(self, out_dir: Path) -> Path:
        path = Path(out_dir) / KV_SCALES_FILE
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path


@dataclass(frozen=True)
class KVScales:
    """Static KV quantization parameters for one bit width; each tensor [num_layers, num_kv_heads]."""

    bits: int
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor


def load_kv_scales(model_dir: str | Path, bits: int) -> KVScales:
    """Read the int8 or int4 tables of kv_cache_scales.json."""
    path = Path(model_dir) / KV_SCALES_FILE
    if not path.is_file():
        raise LmcError(
            f"{model_dir} has no {KV_SCALES_FILE}; run `lmc quantize` on it to calibrate KV scales, "
            "or use dynamic (per-token) KV quantization"
        )
    if bits not in KV_BITS:
        raise LmcError(f"KV cache bits {bits} is not supported; use 8 or 4")
    table = json.loads(path.read_text())[f"int{bits}"]
    return KVScales(bits=bits, **{k: torch.tensor(v, dtype=torch.float32) for k, v in table.items()})
