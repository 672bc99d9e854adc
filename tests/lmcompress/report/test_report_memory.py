"""Weight bytes, KV bytes per token and sequences that fit, checked against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lmcompress.errors import LmcError
from lmcompress.report.memory import (
    ACTIVATION_RESERVE_BYTES, GIB, GpuBudget, disk_bytes, kv_bytes_per_token, turbo_weight_bytes,
)

MIB = 1024**2
CPU = torch.device("cpu")


@pytest.mark.parametrize("kv, per_head", [
    ("float16", 64 * 2),          # head_dim fp16 values
    ("float32", 64 * 4),
    ("int8", 64 + 4),             # codes + float16 scale and zero per (token, head)
    ("int4", 32 + 4),             # packed nibbles + scale and zero
])
def test_kv_bytes_per_token_of_the_reference_model(reference_paths, kv, per_head):
    model_dir, _, _ = reference_paths  # 8 layers, 2 KV heads of 64
    assert kv_bytes_per_token(model_dir, kv) == 2 * 8 * 2 * per_head  # K and V, layers, heads


def test_llama2_7b_fp16_on_a_24_gib_card_fits_four_4096_token_sequences():
    weights = 13_476_839_424  # Llama-2-7B's 6.74B parameters in fp16
    kv_per_token = 2 * 32 * 32 * 128 * 2  # 512 KiB: K and V of 32 layers x 32 heads x 128 dims in fp16
    budget = GpuBudget()  # 24 GiB, 4096 tokens, 2 GiB reserve
    assert budget.kv_bytes_per_sequence(kv_per_token) == 2 * GIB
    # (24 GiB - 12.55 GiB - 2 GiB) / 2 GiB = 4.7
    assert budget.sequences_that_fit(weights, kv_per_token) == 4
    # 4-bit weights (~3.9 GB) and an int4 cache (2 * 32 * 32 * (64 + 4) bytes per token: codes, fp16 scale, zero):
    # (24 GiB - 3.63 GiB - 2 GiB) / 0.53125 GiB = 34.57
    assert budget.sequences_that_fit(3_900_000_000, 2 * 32 * 32 * 68) == 34


def test_sequences_are_counted_in_whole_blocks_and_never_below_zero():
    budget = GpuBudget(gpu_bytes=100 * MIB, context=65, activation_reserve_bytes=0, block_size=64)
    assert budget.kv_bytes_per_sequence(1024) == 128 * 1024  # 65 tokens take two 64-token blocks
    assert budget.sequences_that_fit(0, 1024) == 800
    assert budget.sequences_that_fit(200 * MIB, 1024) == 0  # the weights alone do not fit
    assert GpuBudget().activation_reserve_bytes == ACTIVATION_RESERVE_BYTES == 2 * GIB


def test_unusable_budgets_are_refused():
    with pytest.raises(LmcError, match="--gpu-mem"):
        GpuBudget(context=0)


def _tensor_numels(model_dir) -> dict[str, int]:
    sizes = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                count = 1
                for dim in tensor.get_shape():
                    count *= dim
                sizes[name] = count
    return sizes


def test_turbo_holds_float_weights_at_two_bytes_and_4_bit_linears_packed(tmp_path, reference_paths):
    from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
    from lmcompress.reference.random_checkpoint import make_random_checkpoint

    _, _, calib = reference_paths
    source = make_random_checkpoint(tmp_path / "float", "llama", num_hidden_layers=1)
    numels = _tensor_numels(source)
    # The checkpoint's tensors in fp16, plus the float32 RoPE frequency table (head_dim / 2 values).
    rope = 64 // 2 * 4
    assert turbo_weight_bytes(source, CPU) == 2 * sum(numels.values()) + rope
    assert disk_bytes(source) > 2 * sum(numels.values())  # plus the safetensors headers

    quantized = tmp_path / "rtn"
    quantize_checkpoint(source, quantized, QuantizeOptions(method="rtn", calib_data=str(calib), calib_samples=2,
                                                           calib_seqlen=64, device="cpu"), progress=False)
    linears = {name: numel for name, numel in numels.items()
               if name.startswith("model.layers.") and name.endswith("proj.weight")}
    rest = sum(numels.values()) - sum(linears.values())
    # Per weight: half a byte of code; per group of 128: an fp16 scale and a uint8 zero code.
    packed = sum(numel // 2 + numel // 128 * 3 for numel in linears.values())
    assert turbo_weight_bytes(quantized, CPU) == 2 * rest + packed + rope
