"""Fused RMSNorm (+ residual), silu_and_mul and the rotary embedding: references against transformers and turbo's decoder on the
CPU, the kernels under the Triton interpreter (a subprocess) and compiled on CUDA (skipped without a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lmcompress.turbo.models.decoder import RMSNorm
from lmcompress.turbo.models.rope import RopeConfig, RotaryEmbedding, apply_rotary

pytest.importorskip("triton")
from lmcompress.turbo.kernels.fused import (  # noqa: E402
    rms_norm,
    rms_norm_reference,
    rotary_,
    silu_and_mul,
    silu_and_mul_reference,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled fused kernels need a CUDA GPU")
EPS = 1e-6
# One or two ulps of the output dtype: the kernels' rsqrt / exp differ from torch's in the last float32 bits.
TOLERANCE = {torch.float16: {"rtol": 2e-3, "atol": 1e-5}, torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5}}


def randn(*shape: int, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


# --- references (CPU) ------------------------------------------------------------------------------------------


def test_rms_norm_reference_matches_turbo_decoder_and_transformers():
    x, weight = randn(5, 384), randn(384, seed=1) + 1
    expected = RMSNorm(weight, EPS)(x)
    assert torch.equal(rms_norm_reference(x, weight, EPS), expected)
    hf = LlamaRMSNorm(384, eps=EPS).to(torch.bfloat16)
    hf.weight.data.copy_(weight)
    torch.testing.assert_close(rms_norm_reference(x, weight, EPS), hf(x))


def test_rms_norm_reference_with_residual_returns_normed_sum_and_sum():
    x, residual, weight = randn(5, 384), randn(5, 384, seed=1), randn(384, seed=2) + 1
    normed, summed = rms_norm_reference(x, weight, EPS, residual)
    assert torch.equal(summed, x + residual)
    assert torch.equal(normed, RMSNorm(weight, EPS)(x + residual))


def test_silu_and_mul_reference_is_llama_mlp_activation():
    gate_up = randn(3, 2 * 200)
    expected = ACT2FN["silu"](gate_up[:, :200]) * gate_up[:, 200:]
    assert torch.equal(silu_and_mul_reference(gate_up), expected)


# --- kernels under the Triton interpreter (CPU, a few seconds) ----------------------------------------------

INTERPRETED = textwrap.dedent("""
    import torch
    from lmcompress.turbo.kernels.fused import rms_norm, rms_norm_reference, rotary_, silu_and_mul, silu_and_mul_reference
    from lmcompress.turbo.models.rope import apply_rotary
    torch.manual_seed(0)
    # fp16 and fp32 only: the interpreter truncates float32 -> bf16 where the GPU rounds to nearest.
    # RMSNorm within 2 fp16 ulps: the kernel's float32 rsqrt and the reference's may round x * rstd apart,
    # and the weight's multiply rounds again (an unseeded run once met that at 1 element of 600).
    for dtype in (torch.float16, torch.float32):
        x, residual = torch.randn(3, 200).to(dtype), torch.randn(3, 200).to(dtype)
        weight = (torch.rand(200) + 0.5).to(dtype)
        close = dict(rtol=2e-3, atol=2e-3) if dtype == torch.float16 else {}
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6), **close)
        for got, want in zip(rms_norm(x, weight, 1e-6, residual), rms_norm_reference(x, weight, 1e-6, residual)):
            torch.testing.assert_close(got, want, **close)
        gate_up = torch.randn(2, 3, 2 * 1100).to(dtype)  # two programs per row, the second partly masked
        torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_reference(gate_up))
        # rotary_ on strided slices of a fused qkv row (6 query heads, 2 KV heads of 80: masked lanes and heads)
        qkv = torch.randn(5, 10 * 80).to(dtype)
        angles = torch.rand(5, 40) * 6
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        query, key = qkv[:, :480].view(5, 6, 80), qkv[:, 480:640].view(5, 2, 80)
        want = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        value = qkv[:, 640:].clone()
        rotary_(query, key, cos, sin)
        torch.testing.assert_close(query, want[0], rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(key, want[1], rtol=2e-3, atol=2e-3)
        assert torch.equal(qkv[:, 640:], value)
    print("ok")
""")


def test_kernels_under_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}  # set before triton is imported
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


# --- compiled kernels (CUDA) ------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, hidden", [(1, 4096), (7, 384), (64, 4096), (300, 5120)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference(dtype, tokens, hidden, with_residual):
    x, weight = randn(tokens, hidden, dtype=dtype, device="cuda"), randn(hidden, dtype=dtype, device="cuda", seed=1)
    residual = randn(tokens, hidden, dtype=dtype, device="cuda", seed=2) if with_residual else None
    got, want = rms_norm(x, weight, EPS, residual), rms_norm_reference(x, weight, EPS, residual)
    if with_residual:
        assert torch.equal(got[1], want[1])  # the sum rounds exactly like torch's add
        got, want = got[0], want[0]
    torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, intermediate", [(1, 11008), (5, 1000), (64, 11008)])
def test_silu_and_mul_kernel_matches_reference(dtype, tokens, intermediate):
    gate_up = randn(tokens, 2 * intermediate, dtype=dtype, device="cuda") * 3
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_reference(gate_up), **TOLERANCE[dtype])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim", [(1, 32, 32, 128), (64, 32, 8, 128), (300, 6, 2, 64),
                                                                (3, 5, 1, 80)])
def test_rotary_kernel_matches_apply_rotary(dtype, tokens, heads, kv_heads, head_dim):
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    key = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 32768, (tokens,), device="cuda")
    cos, sin = RotaryEmbedding(RopeConfig(theta=500000.0), head_dim).to("cuda")(positions)
    want_q, want_k = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    value = qkv[:, (heads + kv_heads) * head_dim :].clone()
    rotary_(query, key, cos, sin)
    # The kernel rounds once from float32; the reference rounds cos, sin and each product to the dtype first,
    # so where the two products cancel the difference is an ulp of the products (|x| ~ 1), not of the result.
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(query, want_q, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(key, want_k, rtol=tolerance, atol=tolerance)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], value)  # the value columns are not touched
