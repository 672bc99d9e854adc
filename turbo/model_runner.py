"""The model side of turbo: a Decoder plus its paged KV cache, run one ForwardBatch at a time.

Build order: weights first (from a checkpoint directory, or random in dummy mode),
then the KV pool, sized by a block count, a byte budget, or a fraction of the
memory left free by the weights, then (on CUDA) the decode-step CUDA graphs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcompress.calib.kv_stats import KVScales, load_kv_scales
from lmcompress.checkpoint import Checkpoint
from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.turbo import kernels
from lmcompress.turbo.cuda_graph import DecodeGraphs
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.kv_cache import INT_KV_BITS, KV_CACHE_DTYPES, KV_SCALE_MODES, KVCache, KVCacheSpec, free_memory_budget
from lmcompress.turbo.models.decoder import Decoder
from lmcompress.turbo.models.model_config import TORCH_DTYPES, ModelConfig
from lmcompress.turbo.models.weights import CheckpointWeights, DummyWeights, WeightSource



@dataclass(frozen=True, kw_only=True)
class RunnerOptions:
    """How to build the model and its KV cache.

    dtype: compute dtype, "auto" = float32 on the CPU, the checkpoint's dtype elsewhere.
    kv_cache_dtype: "auto" (= dtype), float16, bfloat16, float32, int8 or int4.
    kv_scales: for int8/int4, "dynamic" (per token and head, computed online) or
        "static" (calibrated per-layer, per-head tables, kv_cache_scales.json).
    num_blocks: KV pool size in blocks; else kv_cache_budget, a byte budget; else
        kv_cache_memory_fraction of the memory free after loading the weights
        (CUDA memory, or available RAM on the CPU: pass one of the others there).
    max_model_len: longest sequence served; None = max_position_embeddings.
    dummy: random weights from config.json alone (benchmarks); dummy_quant makes
        the decoder linears random 4-bit QTensors of that config.
    dequantize_weights: dequantize 4-bit linears once at load (faster on the CPU, no memory saving).
    cuda_graphs: on CUDA, replay decode steps from CUDA graphs captured for batch sizes
        up to max_num_seqs (False = eager, vLLM's enforce_eager).
    """

    device: str = "cpu"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    kv_scales: str = "dynamic"
    block_size: int = 64
    num_blocks: int | None = None
    kv_cache_budget: int | None = None  # bytes
    kv_cache_memory_fraction: float = 0.8
    max_model_len: int | None = None
    dummy: bool = False
    dummy_quant: QuantConfig | None = None
    dequantize_weights: bool = False
    cuda_graphs: bool = True
    max_num_seqs: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in TORCH_DTYPES:
            raise LmcError(f"dtype {self.dtype!r} is not supported; use auto, {', '.join(TORCH_DTYPES)}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise LmcError(
                f"KV cache dtype {self.kv_cache_dtype!r} is not supported; use auto, {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.kv_scales not in KV_SCALE_MODES:
            raise LmcError(f"KV scales {self.kv_scales!r} is not supported; use dynamic or static")
        if self.dummy_quant is not None and not self.dummy:
            raise LmcError("dummy_quant only applies to dummy weights; set dummy=True or drop dummy_quant")
        for name in ("block_size", "num_blocks", "kv_cache_budget", "max_model_len", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LmcError(f"RunnerOptions.{name} must be a positive integer, got {value!r}")


class ModelRunner:
    def __init__(self, model_dir: str | Path, options: RunnerOptions = RunnerOptions()):
        self.options = options
        self.model_dir = Path(model_dir)
        self.device = torch.device(options.device)
        hf_config = _read_config(self.model_dir)
        self.config = ModelConfig.from_hf(hf_config, options.max_model_len)
        self.dtype = _compute_dtype(options.dtype, self.device, self.config)
        decoder = Decoder(self.config, self._weight_source(), self.dtype, options.dequantize_weights)
        # Weights are created on the device already; this moves the few derived buffers (RoPE frequencies).
        self.model = decoder.to(self.device).eval()
        kv_dtype = _kv_dtype_name(options.kv_cache_dtype, self.dtype)
        self.kv_spec = KVCacheSpec(
            num_layers=self.config.num_layers,
            num_kv_heads=self.config.num_kv_heads,
            head_dim=self.config.head_dim,
            block_size=options.block_size,
            dtype=kv_dtype,
            static_scales=self._static_kv_scales(kv_dtype),
        )
        self.kv_cache = KVCache(self.kv_spec, self._pool_blocks(), self.device)
        self.decode_graphs = self._capture_decode_graphs()

    def _capture_decode_graphs(self) -> DecodeGraphs | None:
        if not (self.options.cuda_graphs and kernels.available(self.device)):
            return None
        max_blocks = -(-self.max_model_len // self.block_size)
        return DecodeGraphs(self.model, self.kv_cache, self.options.max_num_seqs, max_blocks)

    def _pool_blocks(self) -> int:
        options = self.options
        if options.num_blocks is not None:
            return options.num_blocks
        budget = options.kv_cache_budget or free_memory_budget(self.device, options.kv_cache_memory_fraction)
        return self.kv_spec.num_blocks_for(budget)

    def _weight_source(self) -> WeightSource:
        if self.options.dummy:
            return DummyWeights(self.dtype, self.device, self.options.dummy_quant, self.options.seed)
        return CheckpointWeights(Checkpoint(self.model_dir), self.dtype, self.device)

    def _static_kv_scales(self, kv_dtype: str) -> KVScales | None:
        if self.options.kv_scales == "dynamic":
            return None
        if kv_dtype not in INT_KV_BITS:
            raise LmcError(
                f"static KV scales need an int8 or int4 KV cache, not {kv_dtype}; pass kv_cache_dtype int8 or int4"
            )
        return load_kv_scales(self.model_dir, INT_KV_BITS[kv_dtype])

    @property
    def block_size(self) -> int:
        return self.kv_spec.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def weight_bytes(self) -> int:
        """Bytes of the model's tensors as held (packed 4-bit linears count at 4 bits per weight)."""
        return sum(t.nbytes for t in self.model.buffers())

    def kv_cache_bytes(self) -> int:
        return self.kv_cache.nbytes

    def build_batch(self, seqs: Sequence[SeqInput]) -> ForwardBatch:
        """ForwardBatch.build with this runner's block size and device."""
        return ForwardBatch.build(seqs, self.block_size, self.device)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [len(batch.logits_indices), vocab] float32; the new tokens' K/V land in the cache."""
        if batch.block_size != self.block_size:
            raise LmcError(
                f"the batch uses block size {batch.block_size} but the KV cache {self.block_size}; "
                "build it with runner.build_batch"
            )
        longest = max(batch.context_lens)
        if longest > self.max_model_len:
            raise LmcError(
                f"a sequence reaches {longest} tokens, beyond max_model_len {self.max_model_len}; "
                "shorten it or raise max_model_len"
            )
        if self.decode_graphs is not None and self.decode_graphs.fits(batch):
            return self.decode_graphs.run(batch)
        return self.model(batch, self.kv_cache)


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise LmcError(f"{model_dir} has no config.json; pass a Hugging Face model directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LmcError(f"{path} is not valid JSON ({exc}); restore the file") from exc


def _compute_dtype(name: str, device: torch.device, config: ModelConfig) -> torch.dtype:
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return config.checkpoint_dtype or torch.float16


def _kv_dtype_name(name: str, compute_dtype: torch.dtype) -> str:
    if name != "auto":
        return name
    return next(key for key, value in TORCH_DTYPES.items() if value == compute_dtype)
