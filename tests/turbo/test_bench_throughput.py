"""bench_throughput on the CPU with the reference model: the figures agree with each other and with
the run (ignore_eos token counts, concurrency cap, per-request timings), dummy 4-bit weights, and
the arithmetic of the per-request, per-step and roofline figures on known timings."""

from __future__ import annotations

import dataclasses

import pytest

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo import bench_throughput as bench
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.models.linear import QuantLinear

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ENGINE = EngineConfig(model=REFERENCE_MODEL_DIR, device="cpu", block_size=16, num_kv_blocks=64, max_num_seqs=2)


@pytest.fixture(scope="module")
def engine():
    return bench.build_engine(ENGINE)


def test_run_figures_are_consistent():
    setup = bench.ThroughputConfig(num_prompts=5, input_len=12, output_len=4, concurrency=2, warmup_prompts=1)
    result = bench.run_throughput(ENGINE, setup)
    t, requests = result["throughput"], result["requests"]
    assert t["completed"] == 5 and t["input_tokens"] == 5 * 12
    assert t["output_tokens"] == 5 * 4 and all(r["output_tokens"] == 4 for r in requests)  # ignore_eos
    assert t["output_tok_s"] == pytest.approx(t["output_tokens"] / t["elapsed_s"])
    assert t["total_tok_s"] == pytest.approx((t["input_tokens"] + t["output_tokens"]) / t["elapsed_s"])
    assert t["request_s"] == pytest.approx(5 / t["elapsed_s"])
    assert all(0 < r["ttft_ms"] <= r["e2e_ms"] <= 1e3 * t["elapsed_s"] for r in requests)
    for name, dist in result["latency_ms"].items():
        assert dist["p50"] <= dist["p99"], name
    assert result["config"]["engine"]["max_num_seqs"] == 2 and result["setup"]["warmup_s"] > 0
    steps = result["steps"]["all"]
    assert t["forward_share"] == pytest.approx(steps["steps"] * steps["forward_ms"] / 1e3 / t["elapsed_s"])
    assert 0 < t["forward_share"] < 1
    assert steps["forward_ms"] < steps["wall_ms"]
    assert steps["outside_ms"] == pytest.approx(steps["wall_ms"] - steps["forward_ms"])
    assert result["steps"]["decode"]["tokens_per_step"] == result["steps"]["decode"]["seqs_per_step"]
    prompt = result["steps"]["prompt"]  # the steps that are not decode-only: every prompt token goes through one
    assert prompt["steps"] + result["steps"]["decode"]["steps"] == steps["steps"]
    assert prompt["steps"] * prompt["tokens_per_step"] >= t["input_tokens"]
    memory = result["memory"]
    assert memory["kv_capacity_tokens"] == 64 * 16
    assert memory["kv_cache_bytes"] == 64 * 16 * memory["kv_bytes_per_token"]
    assert result["roofline"] is None  # no copy bandwidth to compare with on the CPU


def test_concurrency_caps_requests_in_flight(engine):
    prompts = bench.bench_prompts(engine, 3, 8, seed=0)
    run = bench.drive(engine, prompts, output_len=3, concurrency=1)
    # One at a time: each request is added only after the previous one's last token.
    for earlier, later in zip(run.requests, run.requests[1:]):
        assert later.added >= earlier.outputs[-1][0]
    assert max(step.num_seqs for step in run.steps) == 1
    run = bench.drive(engine, bench.bench_prompts(engine, 4, 8, seed=1), output_len=3, concurrency=2)
    assert max(step.num_seqs for step in run.steps) == 2
    assert [step.decode for step in run.steps if step.forward_s is not None][:2] == [False, True]


def test_probe_leaves_the_engine_as_it_was(engine):
    bench.drive(engine, bench.bench_prompts(engine, 1, 4, seed=2), output_len=2, concurrency=1)
    assert "schedule" not in vars(engine.scheduler)
    assert not {"forward", "build_batch"} & set(vars(engine.model_runner))


def test_prompts_are_seeded_and_sized(engine):
    prompts = bench.bench_prompts(engine, 4, 9, seed=3)
    assert all(len(p) == 9 for p in prompts) and len({tuple(p) for p in prompts}) == 4
    assert prompts == bench.bench_prompts(engine, 4, 9, seed=3) != bench.bench_prompts(engine, 4, 9, seed=4)


def test_dummy_quant_makes_random_4bit_linears():
    dummy = EngineConfig(model=REFERENCE_MODEL_DIR, device="cpu", num_kv_blocks=4, dummy_weights=True)
    float_engine = bench.build_engine(dummy)
    quant_engine = bench.build_engine(dummy, bench.DUMMY_QUANT["awq-w4g128"])
    linears = [m for m in quant_engine.model_runner.model.modules() if isinstance(m, QuantLinear)]
    assert linears and all(m.group_size == 128 for m in linears)
    assert quant_engine.model_runner.weight_bytes() < 0.4 * float_engine.model_runner.weight_bytes()
    with pytest.raises(LmcError, match=r"set dummy_weights \(--dummy\) or drop dummy_quant"):
        bench.build_engine(ENGINE, bench.DUMMY_QUANT["awq-w4g128"])


def test_bad_settings_name_the_fix():
    with pytest.raises(LmcError, match="--concurrency must be an integer >= 1"):
        bench.ThroughputConfig(num_prompts=1, input_len=1, output_len=1, concurrency=0)
    with pytest.raises(LmcError, match="raise --max-model-len"):
        bench.run_throughput(ENGINE, bench.ThroughputConfig(num_prompts=1, input_len=1000, output_len=100,
                                                            concurrency=1))
    with pytest.raises(LmcError, match="unknown --quant"):
        bench.run_throughput(ENGINE, bench.ThroughputConfig(num_prompts=1, input_len=1, output_len=1,
                                                            concurrency=1), quant="w3")


def test_request_figures_from_known_times():
    trace = bench.RequestTrace(prompt_len=8, added=10.0, outputs=[(10.5, 1), (10.7, 1), (11.1, 2)])
    assert trace.output_tokens == 4
    assert trace.ttft == pytest.approx(0.5) and trace.e2e == pytest.approx(1.1)
    assert trace.tpot == pytest.approx(0.6 / 3)
    assert trace.itl == pytest.approx([0.2, 0.4])
    assert bench.RequestTrace(prompt_len=8, added=0.0, outputs=[(1.0, 1)]).tpot is None
    latency = bench.latency_figures([trace])
    assert latency["ttft"] == pytest.approx({"mean": 500.0, "p50": 500.0, "p99": 500.0})
    assert bench.distribution_ms([]) == {"mean": None, "p50": None, "p99": None}


def test_overlapped_passes_take_the_wall_of_the_call_that_read_them_back():
    prompt = bench.StepRecord(wall_s=0.001, forward_s=0.150, num_seqs=2, num_tokens=256)
    decode = bench.StepRecord(wall_s=0.001, forward_s=0.005, num_seqs=2, num_tokens=2, decode=True)
    reads_only = bench.StepRecord(wall_s=0.004)
    # Call 2 waited for the prompt pass, call 3 for the decode pass; call 1 only launched.
    calls = [prompt, dataclasses.replace(decode, wall_s=0.152), dataclasses.replace(reads_only, wall_s=0.006)]
    overlapped = bench.pass_walls(calls, read_back_later=True)
    assert [(p.num_tokens, p.wall_s) for p in overlapped] == [(256, 0.152), (2, 0.006)]
    assert bench.step_figures([p for p in overlapped if p.decode])["outside_ms"] == pytest.approx(1.0)
    # Run inside their calls, passes keep their own call's wall; calls that ran nothing are not passes.
    assert [p.wall_s for p in bench.pass_walls(calls, read_back_later=False)] == [0.001, 0.152]


def test_step_and_roofline_figures_from_known_times():
    steps = [
        bench.StepRecord(wall_s=0.010, forward_s=0.008, num_seqs=2, num_tokens=40, kv_tokens=40),
        bench.StepRecord(wall_s=0.004, forward_s=0.003, num_seqs=2, num_tokens=2, kv_tokens=1000, decode=True),
        bench.StepRecord(wall_s=0.006, forward_s=0.005, num_seqs=2, num_tokens=2, kv_tokens=3000, decode=True),
        bench.StepRecord(wall_s=0.001),  # nothing scheduled: no forward, not counted
    ]
    figures = bench.step_figures(steps)
    assert figures["steps"] == 3 and figures["wall_ms"] == pytest.approx(20 / 3)
    assert figures["outside_ms"] == pytest.approx(4 / 3) and figures["outside_fraction"] == pytest.approx(0.2)
    # 1 GB/s; a decode step streams 1 MB of weights plus 1000 bytes per context token.
    roof = bench.roofline_figures(steps, copy_gbps=1.0, weight_bytes=10**6, kv_bytes_per_token=1000)
    bounds = [(10**6 + 10**6) / 1e9, (10**6 + 3 * 10**6) / 1e9]
    assert roof["decode_bound_ms"] == pytest.approx(1e3 * sum(bounds) / 2)
    assert roof["of_step_wall"] == pytest.approx(sum(bounds) / 0.010)
    assert roof["of_forward"] == pytest.approx(sum(bounds) / 0.008)
