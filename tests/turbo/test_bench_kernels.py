"""bench_kernels on the CPU: the byte and FLOP counts, the derived rates, the random operands,
and a whole run with stand-in kernels and a fixed timer (real timings need CUDA)."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
import torch.nn.functional as F

from lmcompress.errors import LmcError
from lmcompress.turbo import bench_kernels as bench
from lmcompress.turbo.attention import causal_attention, context_slots
from lmcompress.turbo.kv_cache import KVCacheSpec

TIMER_MS = 2.0


def fixed_timer(fn) -> float:
    fn()  # the call must work; its time is fixed so the derived figures are exact
    return TIMER_MS


FIXED = bench.Timers(graphed=fixed_timer, eager=fixed_timer)


def test_linear_counts_at_llama_shapes():
    assert bench.linear_flops(16, 4096, 11008) == 2 * 16 * 4096 * 11008
    # 4096 x 4096 at g128: 8 MiB of codes, 131072 groups of a 2-byte scale and a 4-bit zero.
    assert bench.w4_weight_bytes(4096, 4096, 128, 2) == 8 * 2**20 + 131072 * 2 + 65536
    assert bench.dense_weight_bytes(4096, 4096, 2) == 32 * 2**20
    # The W4 weight is about 3.8x smaller than bf16 with its scales and zeros.
    ratio = bench.dense_weight_bytes(4096, 11008, 2) / bench.w4_weight_bytes(4096, 11008, 128, 2)
    assert 3.7 < ratio < 3.9
    assert bench.linear_bytes(3, 10, 20, weight_bytes=1000, itemsize=2) == 1000 + (3 * 20 + 3 * 10) * 2


def test_decode_attention_counts():
    # Two sequences of 100 and 28 tokens, 8 KV heads of 68 bytes per token (e.g. int4 codes plus a scale/zero pair).
    got = bench.decode_attention_bytes([100, 28], num_heads=32, num_kv_heads=8, head_dim=128,
                                       kv_bytes_per_head_token=68, itemsize=2)
    assert got == 2 * 128 * 8 * 68 + 2 * 2 * 32 * 128 * 2  # K and V, then queries in and outputs out
    assert bench.decode_attention_flops([100, 28], num_heads=32, head_dim=128) == 4 * 128 * 32 * 128


def test_small_op_bytes_and_rates():
    assert bench.rms_norm_bytes(5, 64, 2) == (4 * 5 * 64 + 64) * 2
    assert bench.silu_and_mul_bytes(5, 96, 2) == 3 * 5 * 96 * 2
    row = bench.Measurement("linear", "torch", {}, bytes=3 * 10**9, flops=5 * 10**12, time_us=1e6)
    assert row.gbps == pytest.approx(3.0) and row.tflops == pytest.approx(5.0)
    assert bench.Measurement("rms_norm", "triton", {}, bytes=1, flops=0, time_us=1.0).tflops is None
    assert bench.Measurement("linear", "w4a16", {}, bytes=1, flops=1, status="missing").gbps is None


def test_failure_status_tells_missing_from_broken():
    assert bench.failure_status(ModuleNotFoundError("No module named 'w4a16'")) == "missing"
    assert bench.failure_status(RuntimeError("bad launch\nsecond line")) == "error: RuntimeError: bad launch"
    with pytest.raises(ImportError, match="has no no_such_kernel"):
        bench.load_kernel("__init__", "no_such_kernel")


def test_measure_keeps_going_after_a_failure():
    def broken():
        raise ValueError("shape mismatch")

    row = bench.measure(bench.Measurement("linear", "w4a16", {}, 1, 1), fixed_timer, broken)
    assert row.status == "error: ValueError: shape mismatch" and row.time_us is None
    row = bench.measure(bench.Measurement("linear", "torch", {}, 1, 1), fixed_timer, lambda: lambda: None)
    assert row.status == "ok" and row.time_us == pytest.approx(TIMER_MS * 1e3)


def test_int4pack_scales_reproduce_the_awq_dequantization():
    generator = torch.Generator().manual_seed(0)
    qt = bench.random_qtensor(8, 256, 128, torch.float32, torch.device("cpu"), generator)
    assert qt.q.float().std() > 3 and qt.scales.min() > 0  # random codes, no zero scales
    scales_and_zeros = bench.int4pack_scales_and_zeros(qt, torch.float32)  # [K/g, N, 2]
    assert scales_and_zeros.shape == (2, 8, 2)
    groups = torch.arange(256) // 128
    scale = scales_and_zeros[groups, :, 0].T  # [N, K]
    offset = scales_and_zeros[groups, :, 1].T
    torch.testing.assert_close((qt.q.float() - 8) * scale + offset, qt.dequantize())


def test_filled_kv_cache_pages_random_kv_through_shuffled_blocks():
    spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=16, block_size=16, dtype="int4")
    generator = torch.Generator().manual_seed(0)
    cache, tables = bench.filled_kv_cache(spec, [40, 16, 5], torch.device("cpu"), generator, torch.float32)
    assert cache.num_blocks == 3 + 1 + 1 and tables.shape == (3, 3) and tables.dtype == torch.int32
    used = torch.cat([tables[0, :3], tables[1, :1], tables[2, :1]])
    assert sorted(used.tolist()) == list(range(5))  # every block belongs to exactly one sequence
    assert used.tolist() != list(range(5))  # and they are not handed out in order
    keys, values = cache.layers[0].read(torch.arange(80), torch.float32)
    assert keys.std() > 0.5 and values.std() > 0.5


def test_require_kernel_device_names_the_fix():
    with pytest.raises(LmcError, match="run it on a CUDA machine"):
        bench.require_kernel_device(torch.device("cpu"))


def _stand_in_kernels(name: str):
    """Plain-torch stand-ins with the contract's signatures, in place of the Triton modules."""
    class PackedW4:
        def __init__(self, weight):
            self.weight = weight

        @classmethod
        def from_qtensor(cls, qt, dtype):
            return cls(qt.dequantize(dtype))

    def paged_decode_attention(query, cache, block_tables, seq_lens, scale):
        out = []
        for row, length in enumerate(seq_lens.tolist()):
            keys, values = cache.read(context_slots(block_tables[row], length, 16), query.dtype)
            out.append(causal_attention(query[row:row + 1], keys, values, scale))
        return torch.cat(out)

    def rms_norm(x, weight, eps, residual):
        summed = x + residual
        return F.rms_norm(summed, weight.shape, weight, eps), summed

    def silu_and_mul(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    modules = {
        "w4a16": {"PackedW4": PackedW4, "w4a16_matmul": lambda x, w: F.linear(x, w.weight)},
        "paged_attention": {"paged_decode_attention": paged_decode_attention},
        "fused": {"rms_norm": rms_norm, "rms_norm_reference": rms_norm, "silu_and_mul": silu_and_mul,
                  "silu_and_mul_reference": silu_and_mul},
    }
    return types.SimpleNamespace(**modules[name])


TINY = bench.KernelBenchConfig(
    dtype=torch.float32, linears=(bench.LinearShape("up", 64, 256),), rows=(1, 3), group_size=128,
    attention_cases=((1, 40), (2, 20)), num_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
    hidden_size=32, intermediate_size=48, fused_tokens=(3,), matmul_size=32, copy_bytes=2**16,
)


def test_whole_run_with_stand_in_kernels(monkeypatch):
    monkeypatch.setattr(bench, "load_kernel", lambda module, name: getattr(_stand_in_kernels(module), name))
    result = bench.run_kernel_bench(TINY, torch.device("cpu"), FIXED)
    assert result.copy_gbps == pytest.approx(2 * 2**16 / TIMER_MS / 1e6)
    assert result.matmul_tflops == pytest.approx(2 * 32**3 / TIMER_MS / 1e9)
    by_key = {(r.kernel, r.impl, tuple(r.case.values())): r for r in result.measurements}
    # torch's int4 kernel has no CPU implementation; everything else ran.
    assert {r.status for r in result.measurements if r.impl != "int4pack"} == {"ok"}
    assert all(r.status.startswith("error:") for r in result.measurements if r.impl == "int4pack")
    w4 = by_key[("linear", "w4a16", ("up", 3, 64, 256))]
    assert w4.rel_err < 1e-6  # the stand-in computes the reference's product
    assert w4.bytes == bench.linear_bytes(3, 64, 256, bench.w4_weight_bytes(64, 256, 128, 4), 4)
    assert result.speedup(w4) == pytest.approx(1.0)
    assert result.copy_fraction(w4) == pytest.approx(w4.gbps / result.copy_gbps)
    int8 = by_key[("paged_decode_attention", "int8", (2, 20))]
    assert result.baseline_of(int8).impl == "float32"
    assert int8.bytes < by_key[("paged_decode_attention", "float32", (2, 20))].bytes
    assert result.layer_linear_us() == [{"m": 1, "torch_us": 2000.0, "w4a16_us": 2000.0, "int4pack_us": None},
                                        {"m": 3, "torch_us": 2000.0, "w4a16_us": 2000.0, "int4pack_us": None}]
    record = result.to_dict()
    assert len(record["measurements"]) == len(result.measurements)
    titles = [title for title, _, _ in bench.tables(result)]
    assert titles[0] == "Roofs" and any(title.startswith("paged_decode_attention") for title in titles)


def test_decode_sized_calls_take_the_graph_timer_and_prompt_sized_ones_the_eager_timer(monkeypatch):
    monkeypatch.setattr(bench, "load_kernel", lambda module, name: getattr(_stand_in_kernels(module), name))
    config = dataclasses.replace(TINY, rows=(1, bench.GRAPHED_BELOW_ROWS), fused_tokens=(3, bench.GRAPHED_BELOW_ROWS))
    timers = bench.Timers(graphed=lambda fn: 1.0, eager=lambda fn: 3.0)
    result = bench.run_kernel_bench(config, torch.device("cpu"), timers)
    assert result.copy_gbps == pytest.approx(2 * 2**16 / 3.0 / 1e6)  # the roofs are eager, as measured before
    timed_ms = {(r.kernel, r.impl, r.case.get("m", r.case.get("tokens"))): r.time_us / 1e3
                for r in result.measurements if r.status == "ok"}
    assert timed_ms[("linear", "w4a16", 1)] == timed_ms[("linear", "torch", 1)] == 1.0
    assert timed_ms[("linear", "w4a16", bench.GRAPHED_BELOW_ROWS)] == 3.0
    assert timed_ms[("rms_norm", "triton", 3)] == 1.0 and timed_ms[("silu_and_mul", "triton", 256)] == 3.0
    assert {ms for (kernel, _, _), ms in timed_ms.items() if kernel == "paged_decode_attention"} == {1.0}


def test_rows_of_a_missing_module_say_missing(monkeypatch):
    def no_kernels(module, name):
        raise ModuleNotFoundError(f"No module named 'lmcompress.turbo.kernels.{module}'")

    monkeypatch.setattr(bench, "load_kernel", no_kernels)
    result = bench.run_kernel_bench(TINY, torch.device("cpu"), FIXED)
    statuses = {(r.kernel, r.impl): r.status for r in result.measurements}
    assert statuses[("linear", "torch")] == "ok"
    assert statuses[("linear", "w4a16")] == statuses[("paged_decode_attention", "int4")] == "missing"
    assert statuses[("rms_norm", "triton")] == "missing"
    linear_table = next(rows for title, _, rows in bench.tables(result) if title.startswith("linear"))
    assert ["shape=up m=1 n=64 k=256", "w4a16", "missing", "", "", "", "", ""] in linear_table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device (run on the lent GPU)")
def test_graph_timer_agrees_with_do_bench_where_launches_do_not_matter():
    # Scaling 512 MiB into another 512 MiB takes ~0.25 ms: the launch is noise for both timers, so they must
    # agree.  (Not a copy_: captured, a device-to-device memcpy becomes a graph memcpy node, which measured
    # 0.39 ms where the eager copy took 0.26 on the H200.)
    source = torch.ones(2**28, dtype=torch.float16, device="cuda")
    target = torch.empty_like(source)
    graphed, eager = bench.CudaGraphTimer(calls=10), bench.cuda_timer()
    scale = lambda: torch.mul(source, 2.0, out=target)  # noqa: E731
    assert graphed(scale) == pytest.approx(eager(scale), rel=0.15)
    # A call of a few microseconds still times positive (the flush-only graph is subtracted, not more).
    small = torch.ones(4096, device="cuda")
    assert 0 < graphed(lambda: small.mul_(1.0)) < 0.02
