"""What a compressed model costs in memory: weight bytes, KV bytes per token, sequences that fit on a GPU.

    KV budget        = GPU memory - weights in memory - activation reserve
    bytes / sequence = ceil(context / block_size) * block_size * KV bytes per token
    sequences        = floor(KV budget / bytes per sequence)        (0 when the budget is <= 0)

The activation reserve is a fixed ACTIVATION_RESERVE_BYTES (2 GiB) unless the
caller passes another: about 0.5 GiB of CUDA context and kernel workspaces, plus
the transient activations of one 8192-token prefill step of a 7B model (the
11008-wide gate, up and product tensors of the MLP and a few 4096-wide hidden
states in fp16, about 0.75 GiB; logits only for last tokens), plus room for
allocator fragmentation.  Sequences are counted
in whole KV blocks, as the paged cache allocates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmcompress.checkpoint import Checkpoint
from lmcompress.errors import LmcError

GIB = 1024**3
DEFAULT_GPU_BYTES = 24 * GIB  # a mid-range card
DEFAULT_CONTEXT = 4096
ACTIVATION_RESERVE_BYTES = 2 * GIB
BLOCK_SIZE = 64  # turbo's KV block length


@dataclass(frozen=True)
class GpuBudget:
    gpu_bytes: int = DEFAULT_GPU_BYTES
    context: int = DEFAULT_CONTEXT  # tokens per sequence
    activation_reserve_bytes: int = ACTIVATION_RESERVE_BYTES
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.gpu_bytes <= 0 or self.context < 1 or self.activation_reserve_bytes < 0:
            raise LmcError(
                f"GPU budget of {self.gpu_bytes} bytes, context {self.context} and activation reserve "
                f"{self.activation_reserve_bytes} bytes is not usable; pass a positive --gpu-mem and --context"
            )

    def kv_bytes_per_sequence(self, kv_bytes_per_token: int) -> int:
        blocks = -(-self.context // self.block_size)
        return blocks * self.block_size * kv_bytes_per_token

    def sequences_that_fit(self, weight_bytes: int, kv_bytes_per_token: int) -> int:
        """Concurrent sequences of `context` tokens whose KV fits beside the weights and the reserve."""
        kv_budget = self.gpu_bytes - weight_bytes - self.activation_reserve_bytes
        return max(0, kv_budget // self.kv_bytes_per_sequence(kv_bytes_per_token))


def kv_bytes_per_token(model_dir: str | Path, kv_cache_dtype: str) -> int:
    """Bytes one token's K and V occupy across all layers in turbo's cache (int8/int4 with per-token scales)."""
    from lmcompress.turbo.kv_cache import KVCacheSpec
    from lmcompress.turbo.models.model_config import ModelConfig

    config = ModelConfig.from_hf(Checkpoint(model_dir).config)
    spec = KVCacheSpec(num_layers=config.num_layers, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                       block_size=BLOCK_SIZE, dtype=kv_cache_dtype)
    return spec.bytes_per_token()


def disk_bytes(model_dir: str | Path) -> int:
    """Bytes of the checkpoint's safetensors shards."""
    return Checkpoint(model_dir).total_bytes()


def turbo_weight_bytes(model_dir: str | Path, device: torch.device) -> int:
    """Bytes of the weights as turbo holds them on `device` when serving in float16 (4-bit linears stay packed).

    Loaded on the report's device, so on CUDA the count is of the layout the GPU serves
    from and the packing of 4-bit codes runs there rather than on the host's cores; no
    CUDA graphs are captured, only the weights are wanted.
    """
    from lmcompress.turbo.model_runner import ModelRunner, RunnerOptions

    options = RunnerOptions(device=str(device), dtype="float16", num_blocks=1, cuda_graphs=False)
    return ModelRunner(model_dir, options).weight_bytes()
