"""The W4A16 kernel against its reference: layout and reference on the CPU, the kernel logic under the
Triton interpreter (a subprocess on CPU tensors), and the compiled kernel on CUDA (skipped without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QTensor, concat_out_features

pytest.importorskip("triton")
from lmcompress.turbo.kernels.w4a16 import (
    M_BUCKETS,
    PackedW4,
    TileConfig,
    w4a16_matmul,
    w4a16_reference,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled W4A16 kernel needs a CUDA GPU")

# Per-dtype bound on max|kernel - reference| / max|reference|: the kernel accumulates in float32 in its own
# order and (GEMV) skips the reference's rounding of the weights to the activation dtype.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


def random_qtensor(out_features: int, in_features: int, group_size: int, act_order: bool = False,
                   scale_dtype: torch.dtype = torch.float16, device: str = "cpu", seed: int = 0) -> QTensor:
    """Random codes, zero points and positive scales: no zeros that could hide a wrong nibble or group."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    qt = QTensor(
        q=torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(out_features, groups, generator=gen) * 0.01 + 0.001).to(scale_dtype),
        zeros=torch.randint(0, 16, (out_features, groups), generator=gen, dtype=torch.uint8),
        bits=4,
        group_size=group_size,
    )
    if act_order:  # GPTQ act-order: each group's channels scattered over the input
        qt.g_idx = qt.group_index()[torch.randperm(in_features, generator=gen)].to(torch.int32)
    return QTensor(qt.q.to(device), qt.scales.to(device), qt.zeros.to(device), 4, group_size,
                   None if qt.g_idx is None else qt.g_idx.to(device))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# --- layout and reference (CPU) ---------------------------------------------------------------------------


@pytest.mark.parametrize("group_size, in_features, act_order, scale_dtype", [
    (128, 256, False, torch.float16), (64, 384, True, torch.float32), (32, 96, False, torch.bfloat16),
    (32, 160, True, torch.float16),
])
def test_packed_dequantize_equals_qtensor_dequantize_exactly(group_size, in_features, act_order, scale_dtype):
    qt = random_qtensor(24, in_features, group_size, act_order, scale_dtype)
    packed = PackedW4.from_qtensor(qt, torch.bfloat16)
    assert packed.padded_in_features % 128 == 0 and packed.qweight.shape == (packed.padded_in_features // 8, 24)
    assert torch.equal(packed.dequantize(), qt.dequantize(torch.bfloat16))
    assert torch.equal(packed.dequantize(torch.float32), qt.dequantize(torch.float32))
    back = packed.to_qtensor()
    assert torch.equal(back.dequantize(), qt.dequantize())
    if not act_order:
        assert torch.equal(back.q, qt.q) and torch.equal(back.zeros, qt.zeros) and torch.equal(back.scales, qt.scales)


def test_each_byte_holds_two_neighbouring_channels_of_a_32_channel_slice():
    # Code of channel k is k % 16 in every row: byte i of row r of a block holds channels 32i + 2r (low
    # nibble) and 32i + 2r + 1 (high nibble), so nibble j of row r holds code (2r + j % 2) % 16.
    q = (torch.arange(256) % 16).to(torch.uint8).expand(8, 256).contiguous()
    qt = QTensor(q, torch.ones(8, 2), torch.zeros(8, 2, dtype=torch.uint8), 4, 128)
    qweight = PackedW4.from_qtensor(qt, torch.float32).qweight  # [32, 8]
    nibbles = torch.stack([(qweight >> (4 * j)) & 0xF for j in range(8)], dim=-1)  # [row, n, j]
    rows, planes = torch.arange(32) % 16, torch.arange(8)
    expected = (2 * rows[:, None] + planes[None, :] % 2) % 16  # [row, j]
    assert torch.equal(nibbles, expected[:, None, :].expand(32, 8, 8).to(nibbles.dtype))


def test_reference_is_f_linear_over_the_qtensor_weight():
    qt = random_qtensor(40, 256, 64, act_order=True)
    x, bias = torch.randn(5, 256), torch.randn(40)
    expected = torch.nn.functional.linear(x, qt.dequantize(), bias)
    torch.testing.assert_close(w4a16_reference(x, PackedW4.from_qtensor(qt, torch.float32), bias), expected)


def test_stacked_weights_pack_as_one():
    parts = [random_qtensor(n, 256, 128, seed=n) for n in (16, 8, 24)]
    packed = PackedW4.from_qtensor(concat_out_features(parts), torch.float16)
    assert packed.out_features == 48
    assert torch.equal(packed.dequantize(), torch.cat([p.dequantize(torch.float16) for p in parts]))


def test_unequal_act_order_groups_and_odd_group_sizes_are_rejected():
    qt = random_qtensor(8, 256, 128)
    qt.g_idx = torch.zeros(256, dtype=torch.int32)  # every channel in group 0
    with pytest.raises(LmcError, match="groups that are not 128 channels"):
        PackedW4.from_qtensor(qt, torch.float16)
    with pytest.raises(LmcError, match="group size 32, 64 or 128"):
        PackedW4.from_qtensor(QTensor(qt.q[:, :48], qt.scales[:, :1], qt.zeros[:, :1], 4, 48), torch.float16)


# --- kernel logic under the Triton interpreter (CPU, ~5 s) -------------------------------------------------

INTERPRETED = textwrap.dedent("""
    import torch
    from lmcompress.turbo.kernels.w4a16 import PackedW4, TileConfig, w4a16_matmul, w4a16_reference
    from test_w4a16_kernel import random_qtensor, relative_error
    # (config, M, K, group size, dtype, act-order): the GEMV, the tiles with each group size (1, 2 or 4
    # groups a block) and the scale applied after or before the dot, split (programs_per_sm 64 on the interpreter's one "SM": two-pass reduction) and not,
    # a partial last N tile, K padded to 128, act-order, and (config None, M >= 256) dequantize + matmul.  No bf16: the interpreter truncates float32 -> bf16 and its tl.dot
    # mishandles bf16 operands.
    cases = [(TileConfig(1, 32, 1, 1, 64), 2, 256, 64, torch.float16, False),
             (TileConfig(1, 32, 1, 1, 1), 1, 384, 128, torch.float32, True),
             (TileConfig(1, 32, 1, 1, 64), 1, 128, 32, torch.float32, False),
             (TileConfig(16, 32, 4, 1, 1), 3, 96, 32, torch.float32, True),
             (TileConfig(16, 32, 4, 1, 64), 3, 256, 128, torch.float16, False),
             (TileConfig(16, 32, 4, 1, 64), 17, 384, 32, torch.float16, False),
             (TileConfig(16, 32, 4, 1, 64), 5, 256, 64, torch.float32, False),
             (TileConfig(16, 32, 4, 1, 64, scale_in_weight=True), 17, 384, 32, torch.float16, True),
             (None, 256, 160, 32, torch.float32, True)]
    for config, m, k, group_size, dtype, act_order in cases:
        w = PackedW4.from_qtensor(random_qtensor(48, k, group_size, act_order), dtype)
        x, bias = torch.randn(m, k).to(dtype), torch.randn(48).to(dtype)
        out = w4a16_matmul(x, w, bias, config)
        error = relative_error(out, w4a16_reference(x.float(), w, bias.float()))
        assert error < {torch.float16: 2e-3, torch.float32: 2e-5}[dtype], (config, error)
        assert torch.equal(w4a16_matmul(x, w, bias, config), out), config  # split-K is deterministic
    print("ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check of the kernel logic; the GPU runs the "
                    "compiled kernel tests below (and GPU builds of triton may lack a working interpreter)")
def test_kernel_logic_under_the_triton_interpreter():
    # The interpreter must be switched on before triton is imported, hence a fresh process; it imports this
    # file's helpers from this file's directory.
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True, check=False,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# --- the compiled kernel (CUDA) -----------------------------------------------------------------------------


# Llama-2-7B's four linears (qkv, o, gate_up, down) as (N, K): down at full size, the others scaled down.
SHAPES_7B_LIKE = [(3072, 1024), (1024, 1024), (5504, 1024), (4096, 11008)]
M_VALUES = [1, 3, 16, 33, 64, 256, 300]  # GEMV, each tile bucket, split and not, dequantize + cuBLAS


@needs_cuda
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("out_features, in_features", SHAPES_7B_LIKE)
def test_kernel_matches_reference_over_m_buckets(m, out_features, in_features):
    w = PackedW4.from_qtensor(random_qtensor(out_features, in_features, 128, device="cuda"), torch.bfloat16)
    x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(out_features, device="cuda", dtype=torch.bfloat16)
    expected = w4a16_reference(x.float(), w, bias.float())
    assert relative_error(w4a16_matmul(x, w, bias), expected) < TOLERANCE[torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_kernel_matches_reference_over_dtypes_and_group_sizes(dtype, group_size, m):
    w = PackedW4.from_qtensor(random_qtensor(1024, 2048, group_size, device="cuda", seed=group_size), dtype)
    x = torch.randn(m, 2048, device="cuda", dtype=dtype)
    bias = torch.randn(1024, device="cuda", dtype=dtype)
    expected = w4a16_reference(x.float(), w, bias.float())
    assert relative_error(w4a16_matmul(x, w, bias), expected) < TOLERANCE[dtype]


@needs_cuda
@pytest.mark.parametrize("config", [TileConfig(1, 512, 4, 1, 2), TileConfig(1, 256, 2, 1, 4),
                                    TileConfig(16, 64, 4, 3, 3), TileConfig(16, 128, 4, 3, 3),
                                    TileConfig(64, 128, 4, 3, 2), TileConfig(64, 128, 8, 3, 4, True),
                                    TileConfig(128, 128, 8, 2, 1, True)])
def test_every_bucket_config_handles_odd_shapes(config):
    # act-order, K padded to 128 (in_features 160), a partial last N tile, M not a multiple of the tile
    w = PackedW4.from_qtensor(random_qtensor(200, 160, 32, act_order=True, device="cuda"), torch.float16)
    x = torch.randn(37, 160, device="cuda", dtype=torch.float16)
    expected = w4a16_reference(x.float(), w)
    assert relative_error(w4a16_matmul(x, w, None, config), expected) < TOLERANCE[torch.float16]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [TileConfig(16, 64, 4, 3, 1), TileConfig(64, 128, 8, 3, 1, True)],
                         ids=["scale-after-dot", "scale-in-weight"])
def test_tiles_dequantize_every_code_exactly(dtype, config):
    # x = the identity: output row c is input channel c's dequantized weight.  The tiles' PTX turns each
    # nibble into q - z exactly, so the rows must equal the reference's dequantized weights bit for bit.
    w = PackedW4.from_qtensor(random_qtensor(64, 256, 32, device="cuda", seed=7), dtype)
    x = torch.eye(256, device="cuda", dtype=dtype)
    assert torch.equal(w4a16_matmul(x, w, None, config), w.dequantize(dtype).t())


@needs_cuda
def test_float32_activations_and_leading_dims():
    w = PackedW4.from_qtensor(random_qtensor(256, 512, 64, scale_dtype=torch.float32, device="cuda"), torch.float32)
    x = torch.randn(2, 5, 512, device="cuda")
    out = w4a16_matmul(x, w)
    assert out.shape == (2, 5, 256) and out.dtype == torch.float32
    assert relative_error(out, w4a16_reference(x, w)) < TOLERANCE[torch.float32]


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 64, 256])
def test_split_k_is_deterministic_and_cuda_graph_capturable(m):
    # Split launches (o_proj-like shape) store partials and sum them in a fixed order: bit-identical results,
    # eagerly and replayed; M = 256 under capture takes the fused kernel instead of dequantize + cuBLAS.
    w = PackedW4.from_qtensor(random_qtensor(4096, 4096, 128, device="cuda"), torch.bfloat16)
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    first = w4a16_matmul(x, w, bias)
    assert torch.equal(w4a16_matmul(x, w, bias), first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    fused_config = next(config for bound, config in M_BUCKETS if m <= bound)  # what capture runs
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs recommends
        fused = w4a16_matmul(x, w, bias, fused_config)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = w4a16_matmul(x, w, bias)
    expected = w4a16_reference(x.float(), w, bias.float())
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, fused)
        assert relative_error(captured, expected) < TOLERANCE[torch.bfloat16]


@needs_cuda
def test_concat_runs_as_one_gemm():
    parts = [random_qtensor(n, 512, 128, device="cuda", seed=n) for n in (256, 128, 128)]
    stacked = PackedW4.from_qtensor(concat_out_features(parts), torch.float16)
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    separate = torch.cat([w4a16_matmul(x, PackedW4.from_qtensor(p, torch.float16)) for p in parts], dim=1)
    torch.testing.assert_close(w4a16_matmul(x, stacked), separate, rtol=2e-3, atol=2e-3)
