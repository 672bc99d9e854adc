"""The paged KV cache: per-layer pools of token slots, in float or quantized to int8/int4.

Slot s of a pool holds the K (or V) of one token for all KV heads; block b owns
slots [b * block_size, (b + 1) * block_size), so a pool viewed as
[num_blocks, block_size, ...] is the blocked layout kernels expect.

Quantization is asymmetric per (token, head) over head_dim, LMDeploy's scheme:
    scale = (max - min) / (2**bits - 1),  zero = min,
    q = clamp(round((x - zero) / scale), 0, 2**bits - 1),  x ~= q * scale + zero.
Online ("dynamic") mode computes scale and zero for every written token and
stores them next to the codes (float32 [slots, heads, 2]); static mode uses the
calibrated per-(layer, head) tables of calib/kv_stats.py and stores codes only.
int4 codes are packed eight to an int32 along head_dim: half the bytes of int8.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmcompress.calib.kv_stats import KVScales
from lmcompress.errors import LmcError
from lmcompress.formats.packing import CODES_PER_INT32, pack_nibbles, unpack_nibbles

FLOAT_KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT_KV_BITS = {"int8": 8, "int4": 4}
# How int8/int4 KV gets its scales: per token and head at write time, or per layer and head from
# the checkpoint's calibration tables (kv_cache_scales.json).
KV_SCALE_MODES = ("dynamic", "static")
KV_CACHE_DTYPES = (*FLOAT_KV_DTYPES, *INT_KV_BITS)
# Bytes of one (token, head) scale/zero pair in dynamic mode.
_DYNAMIC_META_BYTES = 2 * torch.float32.itemsize
# Floor on scale so a constant (token, head) row divides safely; it then dequantizes exactly.
_MIN_SCALE = 1e-8


@dataclass(frozen=True)
class KVCacheSpec:
    """What one token's K/V costs and how it is stored; shared by pool sizing and allocation."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # one of KV_CACHE_DTYPES
    # Calibrated tables, each [num_layers, num_kv_heads], for static int8/int4; None = dynamic per token.
    static_scales: KVScales | None = None

    def __post_init__(self) -> None:
        if self.dtype not in KV_CACHE_DTYPES:
            raise LmcError(f"KV cache dtype {self.dtype!r} is not supported; use one of {', '.join(KV_CACHE_DTYPES)}")
        if self.bits == 4 and self.head_dim % CODES_PER_INT32:
            raise LmcError(f"int4 KV cache needs head_dim divisible by 8, the model has {self.head_dim}; use int8")
        if self.static_scales is not None:
            self._check_static_scales(self.static_scales)

    def _check_static_scales(self, scales: KVScales) -> None:
        if self.bits is None:
            raise LmcError(
                f"static KV scales apply to int8/int4 caches, not {self.dtype}; pick --kv-cache-dtype int8 or int4"
            )
        if scales.bits != self.bits:
            raise LmcError(
                f"static KV scales are for int{scales.bits} but the cache is {self.dtype}; load the int{self.bits} tables"
            )
        expected = (self.num_layers, self.num_kv_heads)
        if tuple(scales.k_scale.shape) != expected:
            raise LmcError(
                f"static KV scales cover [layers, kv_heads] = {list(scales.k_scale.shape)} "
                f"but the model has {list(expected)}; "
                "recalibrate KV scales for this model (lmc quantize) or use dynamic KV quantization"
            )

    @property
    def bits(self) -> int | None:
        """8 or 4 for a quantized cache, None for a float one."""
        return INT_KV_BITS.get(self.dtype)

    @property
    def dynamic(self) -> bool:
        return self.bits is not None and self.static_scales is None

    def bytes_per_head_token(self) -> int:
        """Bytes of one token's K (or V) for one head: codes or floats, plus scale/zero in dynamic mode."""
        if self.bits is None:
            return self.head_dim * FLOAT_KV_DTYPES[self.dtype].itemsize
        return self.head_dim * self.bits // 8 + (_DYNAMIC_META_BYTES if self.dynamic else 0)

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers, K and V."""
        return 2 * self.num_layers * self.num_kv_heads * self.bytes_per_head_token()

    def bytes_per_block(self) -> int:
        return self.block_size * self.bytes_per_token()

    def num_blocks_for(self, budget_bytes: int) -> int:
        """Blocks that fit in budget_bytes, or an LmcError when not even one does."""
        num_blocks = int(budget_bytes) // self.bytes_per_block()
        if num_blocks < 1:
            raise LmcError(
                f"a KV budget of {budget_bytes / 2**20:.1f} MiB holds no block of "
                f"{self.bytes_per_block() / 2**20:.2f} MiB; "
                "free memory, raise the KV memory fraction, pick a smaller KV dtype or pass num_blocks"
            )
        return num_blocks


def free_memory_budget(device: torch.device, fraction: float) -> int:
    """fraction of the device's free memory in bytes (call after loading weights)."""
    if not 0.0 < fraction <= 1.0:
        raise LmcError(f"KV cache memory fraction {fraction} is out of range; pass a value in (0, 1]")
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free * fraction)


def quant_params(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scale and zero of x [..., head_dim] per row: each [..., 1] float32."""
    x = x.float()
    low = x.amin(dim=-1, keepdim=True)
    scale = ((x.amax(dim=-1, keepdim=True) - low) / (2**bits - 1)).clamp(min=_MIN_SCALE)
    return scale, low


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of x, with scale and zero broadcasting against it."""
    return torch.round((x.float() - zero) / scale).clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale + zero).to(dtype)


class FloatKVPool:
    """K or V of one layer in a float dtype: [num_slots, num_kv_heads, head_dim]."""

    def __init__(self, num_slots: int, spec: KVCacheSpec, device: torch.device):
        self.data = torch.zeros(
            num_slots, spec.num_kv_heads, spec.head_dim, dtype=FLOAT_KV_DTYPES[spec.dtype], device=device
        )

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x [T, num_kv_heads, head_dim] into slots [T]."""
        self.data[slots] = x.to(self.data.dtype)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[n, num_kv_heads, head_dim] of slots [n], in dtype."""
        return self.data[slots].to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class QuantKVPool:
    """K or V of one layer as int8 codes [slots, heads, head_dim] or int4 packed [slots, heads, head_dim / 8] int32.

    static: (scale, zero) each [num_kv_heads] for this layer, or None to quantize
    each token online and keep its scale/zero in `meta` [slots, heads, 2].
    """

    def __init__(self, num_slots: int, spec: KVCacheSpec, device: torch.device,
                 static: tuple[torch.Tensor, torch.Tensor] | None):
        self.bits = spec.bits
        heads, dim = spec.num_kv_heads, spec.head_dim
        if self.bits == 4:
            self.data = torch.zeros(num_slots, heads, dim // CODES_PER_INT32, dtype=torch.int32, device=device)
        else:
            self.data = torch.zeros(num_slots, heads, dim, dtype=torch.uint8, device=device)
        self.meta = None if static else torch.zeros(num_slots, heads, 2, dtype=torch.float32, device=device)
        # [heads, 1] each, broadcasting over head_dim
        self.static = None if static is None else tuple(t.to(device, torch.float32)[:, None] for t in static)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        if self.static is None:
            scale, zero = quant_params(x, self.bits)
            self.meta[slots] = torch.cat([scale, zero], dim=-1)
        else:
            scale, zero = self.static
        codes = quantize(x, scale, zero, self.bits)
        self.data[slots] = pack_nibbles(codes) if self.bits == 4 else codes

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = self.data[slots]
        if self.bits == 4:
            codes = unpack_nibbles(codes)
        if self.static is None:
            meta = self.meta[slots]
            scale, zero = meta[..., :1], meta[..., 1:]
        else:
            scale, zero = self.static
        return dequantize(codes, scale, zero, dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.meta.nbytes if self.meta is not None else 0)


KVPool = FloatKVPool | QuantKVPool


class LayerKVCache:
    """The K and V pools of one decoder layer."""

    def __init__(self, keys: KVPool, values: KVPool):
        self.keys = keys
        self.values = values

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [T, num_kv_heads, head_dim] of new tokens into slots [T]."""
        self.keys.write(slots, keys)
        self.values.write(slots, values)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values), each [n, num_kv_heads, head_dim] in dtype, of slots [n]."""
        return self.keys.read(slots, dtype), self.values.read(slots, dtype)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class KVCache:
    """All layers' pools for num_blocks blocks, allocated up front."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: str | torch.device = "cpu"):
        self.spec = spec
        self.num_blocks = num_blocks
        device = torch.device(device)
        num_slots = num_blocks * spec.block_size
        self.layers = [
            LayerKVCache(*(self._pool(num_slots, device, layer, kind) for kind in "kv"))
            for layer in range(spec.num_layers)
        ]

    def _pool(self, num_slots: int, device: torch.device, layer: int, kind: str) -> KVPool:
        if self.spec.bits is None:
            return FloatKVPool(num_slots, self.spec, device)
        tables = self.spec.static_scales
        static = None
        if tables is not None:
            static = (getattr(tables, f"{kind}_scale")[layer], getattr(tables, f"{kind}_zero")[layer])
        return QuantKVPool(num_slots, self.spec, device, static)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
