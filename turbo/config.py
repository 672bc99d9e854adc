"""Runtime configuration of turbo, as small validated dataclasses.

Fields are keyword-only so a required field (num_blocks, max_model_len) can sit
after the fields with defaults; every bad value raises LmcError naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.turbo.kv_cache import FLOAT_KV_DTYPES, INT_KV_BITS, KV_CACHE_DTYPES
from lmcompress.turbo.kv_cache import KV_SCALE_MODES as KV_QUANT_MODES


def _require_positive_int(owner: str, name: str, value: object) -> None:
    # bool is an int subclass; True as a block count is a caller bug, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmcError(f"{owner}.{name} must be an integer >= 1, got {value!r}; pass a positive integer")


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """The paged KV cache: a preallocated pool of `num_blocks` blocks of `block_size` tokens."""

    block_size: int = 64
    num_blocks: int
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _require_positive_int("CacheConfig", "block_size", self.block_size)
        _require_positive_int("CacheConfig", "num_blocks", self.num_blocks)
        if not isinstance(self.enable_prefix_caching, bool):
            raise LmcError(
                f"CacheConfig.enable_prefix_caching must be True or False, "
                f"got {self.enable_prefix_caching!r}; pass a bool"
            )


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    """Limits of one scheduling step and of one request.

    max_num_seqs: most requests running at once (one batch row each).
    max_num_batched_tokens: token budget of one forward pass; longer prompts are
        split into chunks across steps (chunked prefill).
    max_model_len: most tokens (prompt + output) one request may reach.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int

    def __post_init__(self) -> None:
        _require_positive_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs)
        _require_positive_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens)
        _require_positive_int("SchedulerConfig", "max_model_len", self.max_model_len)
        if self.max_model_len < 2:
            raise LmcError(
                f"SchedulerConfig.max_model_len is {self.max_model_len}, which leaves no room for "
                f"a prompt token and an output token; pass max_model_len >= 2"
            )


# Short names the CLI and the HTTP server accept, mapped to the runner's dtype names.
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
# The KV pool on the CPU when neither num_kv_blocks nor kv_cache_bytes is given:
# a fraction of all free RAM (the CUDA rule) would starve everything else on the host.
DEFAULT_CPU_KV_CACHE_BYTES = 2 * 1024**3


def _canonical_dtype(field_name: str, value: object, allowed: tuple[str, ...]) -> str:
    name = DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value
    if name != "auto" and name not in allowed:
        raise LmcError(
            f"EngineConfig.{field_name} must be auto or one of {', '.join(allowed)} "
            f"(or {', '.join(DTYPE_ALIASES)}), got {value!r}; pass one of those"
        )
    return name


def _require_optional_positive_int(name: str, value: object) -> None:
    if value is not None:
        _require_positive_int("EngineConfig", name, value)


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Everything needed to start a turbo engine; validated on construction.

    model: a Hugging Face model directory (float, lmc/AutoAWQ AWQ or GPTQ checkpoint).
    tokenizer: directory of the tokenizer files; None = the model directory.
    device: "auto" (cuda when present), "cpu", "cuda" or "cuda:N".
    dtype: compute dtype; "auto" = float32 on the CPU, the checkpoint's float16/bfloat16 on CUDA.
    kv_cache_dtype: "auto" (= dtype), a float dtype, "int8" or "int4".
    kv_quant: for int8/int4 KV, "dynamic" (scale and zero per token and head, computed
        as tokens are written) or "static" (the checkpoint's calibrated kv_cache_scales.json).
    KV pool size, first that applies: num_kv_blocks; kv_cache_bytes; on CUDA
        gpu_memory_utilization of the memory free after loading the weights; on the
        CPU DEFAULT_CPU_KV_CACHE_BYTES.
    max_model_len: longest prompt + output; None = the model's max_position_embeddings.
    dummy_weights: random weights from config.json alone (benchmarks).
    dummy_quant: with dummy_weights, make the decoder linears random 4-bit weights of this config.
    dequantize_weights: dequantize 4-bit linears once at load (faster on the CPU, no memory saving).
    enforce_eager: on CUDA, run decode steps eagerly instead of replaying captured CUDA graphs
        (graphs cost capture time at start and some memory; eager helps debugging).
    seed: seeds dummy weights and the shared random stream of unseeded sampled requests;
        None = fresh OS entropy for the stream.
    """

    model: str | Path
    tokenizer: str | Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    kv_quant: str = "dynamic"
    block_size: int = 64
    gpu_memory_utilization: float = 0.8
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    dummy_weights: bool = False
    dummy_quant: QuantConfig | None = None
    dequantize_weights: bool = False
    enforce_eager: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        # Frozen: store the canonical dtype names through object.__setattr__.
        object.__setattr__(self, "dtype", _canonical_dtype("dtype", self.dtype, tuple(FLOAT_KV_DTYPES)))
        kv_cache_dtype = _canonical_dtype("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        object.__setattr__(self, "kv_cache_dtype", kv_cache_dtype)
        self._check_paths()
        self._check_device()
        self._check_kv()
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            _require_positive_int("EngineConfig", name, getattr(self, name))
        for name in ("num_kv_blocks", "kv_cache_bytes", "max_model_len"):
            _require_optional_positive_int(name, getattr(self, name))
        for name in ("enable_prefix_caching", "dummy_weights", "dequantize_weights", "enforce_eager"):
            if not isinstance(getattr(self, name), bool):
                raise LmcError(f"EngineConfig.{name} must be True or False, got {getattr(self, name)!r}; pass a bool")
        if self.dummy_quant is not None and not self.dummy_weights:
            raise LmcError("random 4-bit weights (dummy_quant) apply to dummy weights; a checkpoint brings its own "
                           "quantization: set dummy_weights (--dummy) or drop dummy_quant (--quant)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LmcError(f"EngineConfig.seed must be an integer or None, got {self.seed!r}; pass an integer")

    def _check_paths(self) -> None:
        for name in ("model", "tokenizer"):
            value = getattr(self, name)
            if value is None and name == "tokenizer":
                continue
            if not isinstance(value, (str, Path)) or not str(value):
                raise LmcError(f"EngineConfig.{name} must be a directory path, got {value!r}; pass the model directory")

    def _check_device(self) -> None:
        device = self.device
        valid = isinstance(device, str) and (
            device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
        )
        if not valid:
            raise LmcError(f"EngineConfig.device must be auto, cpu, cuda or cuda:N, got {device!r}; pass one of those")

    def _check_kv(self) -> None:
        if self.kv_quant not in KV_QUANT_MODES:
            raise LmcError(f"EngineConfig.kv_quant must be dynamic or static, got {self.kv_quant!r}; pass one of those")
        if self.kv_quant == "static" and self.kv_cache_dtype not in INT_KV_BITS:
            raise LmcError(
                f"EngineConfig.kv_quant is static but kv_cache_dtype is {self.kv_cache_dtype}; static scales "
                "apply to quantized KV, pass kv_cache_dtype int8 or int4 (or kv_quant dynamic)"
            )
        fraction = self.gpu_memory_utilization
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise LmcError(
                f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {fraction!r}; pass e.g. 0.8"
            )
