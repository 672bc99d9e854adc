"""Programmatic dependent launch (turbo/kernels/pdl.py): when it is on, and that a chain of turbo's decode kernels
launched with it, each reading the one before, replayed from a CUDA graph gives bit for bit what the same chain
gives with PDL off (skipped without a Hopper or later GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from lmcompress.turbo.bench_kernels import random_qtensor  # noqa: E402
from lmcompress.turbo.kernels.fused import rms_norm, silu_and_mul  # noqa: E402
from lmcompress.turbo.kernels.pdl import graph_launches, pdl_enabled, pdl_launch  # noqa: E402
from lmcompress.turbo.kernels.w4a16 import PackedW4, w4a16_matmul  # noqa: E402

hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                            reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+")


def test_pdl_is_off_on_the_cpu():
    assert not pdl_enabled(torch.device("cpu"))
    with graph_launches():
        assert pdl_launch(torch.device("cpu")) == {"PDL": False, "launch_pdl": False}


@hopper
def test_pdl_is_on_on_hopper_for_graph_launches_unless_lmc_pdl_is_0(monkeypatch):
    device = torch.device("cuda")
    assert pdl_enabled(device) and pdl_launch(device) == {"PDL": False, "launch_pdl": False}  # eager
    with graph_launches():
        assert pdl_launch(device) == {"PDL": True, "launch_pdl": True}
        assert pdl_launch(device, wanted=False) == {"PDL": False, "launch_pdl": False}
        monkeypatch.setenv("LMC_PDL", "0")
        assert not pdl_enabled(device) and not pdl_launch(device)["PDL"]


def _mlp_chain(x, norm_weight, gate_up, down, layers):
    """x [1, K] through `layers` rounds of RMSNorm -> W4A16 GEMV -> SiLU x mul -> W4A16 GEMV, each launch reading
    the previous one's output: a race at any wait would show in the result."""
    for _ in range(layers):
        x = w4a16_matmul(silu_and_mul(w4a16_matmul(rms_norm(x, norm_weight, 1e-6), gate_up)), down) + x
    return x


@hopper
def test_a_graph_of_pdl_launches_matches_launches_without_pdl():
    device, generator = torch.device("cuda"), torch.Generator(device="cuda").manual_seed(0)
    hidden, inner = 1024, 2816
    gate_up = PackedW4.from_qtensor(random_qtensor(2 * inner, hidden, 128, torch.bfloat16, device, generator),
                                    torch.bfloat16)
    down = PackedW4.from_qtensor(random_qtensor(hidden, inner, 128, torch.bfloat16, device, generator),
                                 torch.bfloat16)
    norm_weight = torch.rand(hidden, device=device, generator=generator, dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, hidden, device=device, generator=generator, dtype=torch.bfloat16)
    expected = _mlp_chain(x, norm_weight, gate_up, down, layers=8)  # eager: without PDL
    with graph_launches():
        _mlp_chain(x, norm_weight, gate_up, down, layers=8)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _mlp_chain(x, norm_weight, gate_up, down, layers=8)
    for _ in range(20):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
