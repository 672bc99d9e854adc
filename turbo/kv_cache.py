"""The paged KV cache: per-layer pools of token slots, in float or quantized to int8/int4.

Slot s of a pool holds the K (or V) of one token for all KV heads; block b owns
slots [b * block_size, (b + 1) * block_size), so a pool viewed as
[num_blocks, block_size, ...] is the blocked layout kernels expect.

Quantization is asymmetric per (token, head) over head_dim, LMDeploy's scheme:
    scale = (max - min) / (2**bits - 1),  zero = min,
    q = clamp(round((x - zero) / scale), 0, 2**bits - 1),  x ~= q * scale + zero.
Online ("dynamic") mode computes scale and zero for every written token and
stores them next to the codes (float16 [slots, heads, 2]: 4 bytes against the 32
of int4 codes at head_dim 64, so int4 holds 3.5x the tokens of float16); static
mode uses the calibrated tables of calib/kv_stats.py, per (layer, head, channel)
or, from older files, per (layer, head), and stores codes only.
int4 codes are packed eight to an int32 along head_dim: half the bytes of int8.

Pools expose their raw tensors (data, meta, static_scale, static_zero) to the
Triton kernels of turbo/kernels/; on CUDA, LayerKVCache.write runs write_kv.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from lmcompress.calib.kv_stats import KVScales
from lmcompress.errors import LmcError
from lmcompress.formats.packing import CODES_PER_INT32, pack_nibbles, unpack_nibbles
from lmcompress.turbo import kernels

FLOAT_KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
INT_KV_BITS = {"int8": 8, "int4": 4}
# How int8/int4 KV gets its scales: per token and head at write time, or per layer and head from
# the checkpoint's calibration tables (kv_cache_scales.json).
KV_SCALE_MODES = ("dynamic", "static")
KV_CACHE_DTYPES = (*FLOAT_KV_DTYPES, *INT_KV_BITS)
# Dtype and bytes of one (token, head) scale/zero pair in dynamic mode.
META_DTYPE = torch.float16
_DYNAMIC_META_BYTES = 2 * META_DTYPE.itemsize
# Floor on the dynamic scale: float16's smallest normal number, so the stored scale keeps
# float16's relative precision and a constant (token, head) row divides safely.
MIN_SCALE = 2.0**-14


@dataclass(frozen=True)
class KVCacheSpec:
    """What one token's K/V costs and how it is stored; shared by pool sizing and allocation."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # one of KV_CACHE_DTYPES
    # Calibrated tables for static int8/int4, each [num_layers, num_kv_heads, head_dim] (per channel)
    # or [num_layers, num_kv_heads] (per head); None = dynamic per token.
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
        per_head = (self.num_layers, self.num_kv_heads)
        per_channel = (*per_head, self.head_dim)
        for name in ("k_scale", "k_zero", "v_scale", "v_zero"):
            shape = tuple(getattr(scales, name).shape)
            if shape not in (per_head, per_channel):
                raise LmcError(
                    f"static KV table {name} has shape {list(shape)} but the model needs [layers, kv_heads] = "
                    f"{list(per_head)} or [layers, kv_heads, head_dim] = {list(per_channel)}; "
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
    """Dynamic scale and zero of x [..., head_dim] per row, each [..., 1] float32 holding the float16 value stored.

    The scale spans [zero, max] from the rounded zero, so the largest element's code
    overshoots 2**bits - 1 by at most (2**bits - 1) * 2**-11 < 0.5 (float16's rounding of
    the scale) and quantizes within half a step; only when the range is tiny next to |min|
    can the smallest element fall below the rounded zero, by float16's own rounding error.
    """
    x = x.float()
    zero = x.amin(dim=-1, keepdim=True).to(META_DTYPE).float()
    # Times the float32 reciprocal, not a division: torch divides by a scalar that way on CUDA,
    # and the Triton write_kv must round identically on every device.
    scale = ((x.amax(dim=-1, keepdim=True) - zero) * (1.0 / (2**bits - 1))).clamp(min=MIN_SCALE)
    return scale.to(META_DTYPE).float(), zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of x, with scale and zero broadcasting against it (round half to even, as the kernels do)."""
    return torch.round((x.float() - zero) / scale).clamp(0, 2**bits - 1).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale + zero).to(dtype)


def _kept(slots: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """slots [T] and x [T, ...] without the rows whose slot is negative (padding rows of CUDA graphs)."""
    keep = slots >= 0
    return slots[keep], x[keep]


def _per_channel(table: torch.Tensor, head_dim: int, device: torch.device) -> torch.Tensor:
    """One layer's static table, [heads] (per head) or [heads, head_dim] -> [heads, head_dim] float32."""
    table = table.to(device, torch.float32)
    if table.dim() == 1:
        table = table[:, None].expand(-1, head_dim)
    return table.contiguous()


class FloatKVPool:
    """K or V of one layer in a float dtype: data [num_slots, num_kv_heads, head_dim]."""

    bits = None

    def __init__(self, num_slots: int, spec: KVCacheSpec, device: torch.device):
        self.head_dim = spec.head_dim
        self.data = torch.zeros(
            num_slots, spec.num_kv_heads, spec.head_dim, dtype=FLOAT_KV_DTYPES[spec.dtype], device=device
        )

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x [T, num_kv_heads, head_dim] into slots [T]; rows with a negative slot are skipped."""
        slots, x = _kept(slots, x)
        self.data[slots] = x.to(self.data.dtype)

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[n, num_kv_heads, head_dim] of slots [n], in dtype."""
        return self.data[slots].to(dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class QuantKVPool:
    """K or V of one layer as codes: data [slots, heads, head_dim] uint8 (int8) or [slots, heads, head_dim / 8] int32 (int4).

    static: this layer's (scale, zero) tables, each [heads] or [heads, head_dim], kept as
    static_scale / static_zero [heads, head_dim] float32; or None to quantize each token
    online and keep its scale/zero in meta [slots, heads, 2] float16.
    """

    def __init__(self, num_slots: int, spec: KVCacheSpec, device: torch.device,
                 static: tuple[torch.Tensor, torch.Tensor] | None):
        self.bits = spec.bits
        heads, dim = spec.num_kv_heads, spec.head_dim
        self.head_dim = dim
        if self.bits == 4:
            self.data = torch.zeros(num_slots, heads, dim // CODES_PER_INT32, dtype=torch.int32, device=device)
        else:
            self.data = torch.zeros(num_slots, heads, dim, dtype=torch.uint8, device=device)
        self.meta = None
        self.static_scale = self.static_zero = None
        if static is None:
            self.meta = torch.zeros(num_slots, heads, 2, dtype=META_DTYPE, device=device)
        else:
            self.static_scale, self.static_zero = (_per_channel(table, dim, device) for table in static)

    def write(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """x [T, heads, head_dim] into slots [T]; rows with a negative slot are skipped."""
        slots, x = _kept(slots, x)
        if self.meta is None:
            scale, zero = self.static_scale, self.static_zero
        else:
            scale, zero = quant_params(x, self.bits)
            self.meta[slots] = torch.cat([scale, zero], dim=-1).to(META_DTYPE)
        codes = quantize(x, scale, zero, self.bits)
        self.data[slots] = pack_nibbles(codes) if self.bits == 4 else codes

    def read(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = self.data[slots]
        if self.bits == 4:
            codes = unpack_nibbles(codes)
        if self.meta is None:
            scale, zero = self.static_scale, self.static_zero
        else:
            meta = self.meta[slots].float()
            scale, zero = meta[..., :1], meta[..., 1:]
        return dequantize(codes, scale, zero, dtype)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.meta.nbytes if self.meta is not None else 0)


KVPool = FloatKVPool | QuantKVPool


class LayerKVCache:
    """The K and V pools of one decoder layer; slot s is token s % block_size of block s // block_size."""

    def __init__(self, keys: KVPool, values: KVPool, block_size: int):
        self.keys = keys
        self.values = values
        self.block_size = block_size

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [T, num_kv_heads, head_dim] of new tokens into slots [T]; negative slots are skipped.

        On CUDA one fused Triton kernel quantizes and stores both; elsewhere (or for head sizes
        the kernel does not take) the pools' reference writes.
        """
        if kernels.available(keys.device):
            from lmcompress.turbo.kernels import kv_write

            if kv_write.supports(keys.shape[-1]):
                kv_write.write_kv(self, slots, keys, values)
                return
        self.write_reference(slots, keys, values)

    def write_reference(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The plain PyTorch write (the oracle of write_kv)."""
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
            LayerKVCache(*(self._pool(num_slots, device, layer, kind) for kind in "kv"), spec.block_size)
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
