"""`lmc bench throughput`, `lmc bench hf` and `lmc bench kernels` through the CLI on the CPU: the
table, the JSON with its environment block, dummy and 4-bit dummy weights, and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lmcompress.cli.bench import format_table
from lmcompress.cli.main import cli
from lmcompress.reference import REFERENCE_MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODEL = str(REFERENCE_MODEL_DIR)
ENGINE = ["--device", "cpu", "--block-size", "16", "--num-kv-blocks", "64"]


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def _check_env(record: dict, command: str, options: dict) -> None:
    env = record["env"]
    assert env["device"].startswith("cpu") and env["torch"] == torch.__version__
    assert env["date"][:2] == "20" and "transformers" in env and "triton" in env
    assert env["command"].endswith(command) and options.items() <= env["options"].items()


def test_throughput_prints_a_table_and_writes_json(tmp_path):
    path = tmp_path / "throughput.json"
    outcome = _invoke(["bench", "throughput", MODEL, *ENGINE, "--num-prompts", "3", "--input-len", "10",
                       "--output-len", "3", "--concurrency", "2", "--seed", "7", "--json", str(path)])
    assert outcome.exit_code == 0, outcome.output
    assert "Output tok/s" in outcome.output and "TTFT p50 / p99 (ms)" in outcome.output
    record = json.loads(path.read_text())
    assert record["bench"] == "throughput"
    _check_env(record, "bench throughput", {"num_prompts": 3, "concurrency": 2, "seed": 7, "device": "cpu"})
    assert record["config"]["seed"] == 7 and record["config"]["concurrency"] == 2
    assert record["throughput"]["output_tokens"] == 3 * 3
    assert f"{record['throughput']['output_tok_s']:.1f}" in outcome.output


def test_throughput_on_dummy_4bit_weights(tmp_path):
    path = tmp_path / "dummy.json"
    outcome = _invoke(["bench", "throughput", MODEL, "--dummy", "--quant", "awq-w4g128", *ENGINE,
                       "--num-prompts", "1", "--input-len", "4", "--output-len", "2", "--concurrency", "1",
                       "--warmup-prompts", "0", "--json", str(path)])
    assert outcome.exit_code == 0, outcome.output
    record = json.loads(path.read_text())
    assert record["config"]["quant"] == "awq-w4g128" and record["config"]["engine"]["dummy_weights"] is True
    assert record["setup"]["warmup_s"] == 0 and record["throughput"]["output_tokens"] == 2
    # The float32 reference model holds 72 MiB; 4-bit linears leave the embedding table and little else.
    assert record["memory"]["weight_bytes"] < 30 * 2**20


def test_profile_adds_device_time_per_kernel(tmp_path):
    path = tmp_path / "profiled.json"
    outcome = _invoke(["bench", "throughput", MODEL, *ENGINE, "--num-prompts", "2", "--input-len", "8",
                       "--output-len", "3", "--concurrency", "2", "--warmup-prompts", "0", "--profile",
                       "--json", str(path)])
    assert outcome.exit_code == 0, outcome.output
    kernels = json.loads(path.read_text())["kernels"]
    names = [row["name"] for row in kernels["rows"]]
    assert any("mm" in name for name in names), names  # the linears' matmuls are there, on the CPU as aten ops
    assert sum(row["share"] for row in kernels["rows"]) <= 1.0 + 1e-9
    assert 0 < kernels["device_us_total"] <= kernels["wall_us_total"] * 2  # two threads at most
    assert "Device time per kernel" in outcome.output and names[0] in outcome.output


def test_quant_without_dummy_is_a_one_line_error():
    outcome = _invoke(["bench", "throughput", MODEL, "--quant", "awq-w4g128", *ENGINE, "--num-prompts", "1"])
    assert outcome.exit_code == 2
    assert outcome.output.strip().count("\n") == 0 and "set dummy_weights (--dummy) or drop dummy_quant (--quant)" in outcome.output


def test_hf_baseline_on_a_dummy_model(tmp_path):
    path = tmp_path / "hf.json"
    outcome = _invoke(["bench", "hf", MODEL, "--dummy", "--device", "cpu", "--dtype", "fp32", "--batch-size", "2",
                       "--input-len", "6", "--output-len", "3", "--cache", "static", "--json", str(path)])
    assert outcome.exit_code == 0, outcome.output
    assert "transformers generate()" in outcome.output and "Output tok/s" in outcome.output
    record = json.loads(path.read_text())
    assert record["bench"] == "hf" and record["config"]["dummy"] is True and record["config"]["cache"] == "static"
    _check_env(record, "bench hf", {"batch_size": 2, "dtype": "fp32", "dummy": True})
    assert record["throughput"]["output_tokens"] == 6


def test_kernels_on_the_cpu_is_a_one_line_error():
    outcome = _invoke(["bench", "kernels", "--device", "cpu"])
    assert outcome.exit_code == 2
    assert outcome.output.strip().count("\n") == 0 and "run it on a CUDA machine" in outcome.output


def test_format_table_aligns_columns():
    table = format_table("T", ["case", "us"], [["m=1", "3.5"], ["m=4096", "120.0"]])
    lines = table.splitlines()
    assert lines[0] == "T" and lines[2] == "case       us"
    assert lines[4] == "m=1       3.5" and lines[5] == "m=4096  120.0"
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[2])
