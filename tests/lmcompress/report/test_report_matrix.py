"""lmc report end to end on the reference model: cells, resume, agreement with single `lmc eval` runs, bad input."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from lmcompress.cli.main import cli
from lmcompress.errors import LmcError
from lmcompress.report import matrix
from lmcompress.report.matrix import CellStore, EvalCell, ModelCell, load_bench_results, parse_kv_dtypes, parse_methods

# Small enough for a 2-core CPU: a few hundred scored tokens, a few task items, tiny calibration.
SMALL = ["--eval-tokens", "384", "--max-length", "128", "--task-limit", "6", "--calib-samples", "2",
         "--calib-seqlen", "64", "--device", "cpu"]


def _report_args(reference_paths, out: Path, methods: str, kv: str, *extra: str,
                 eval_data: str | None = None) -> list[str]:
    model_dir, heldout, calib = reference_paths
    return ["report", str(model_dir), "--methods", methods, "--kv", kv, "--eval-data", eval_data or str(heldout),
            "--out", str(out), "--calib-data", str(calib), *SMALL, *extra]


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, args)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*.json"))}


@pytest.fixture(scope="module")
def small_report(tmp_path_factory, reference_paths) -> Path:
    out = tmp_path_factory.mktemp("report")
    result = _invoke(_report_args(reference_paths, out, "fp16,rtn,bnb-nf4", "fp16,int4"))
    assert result.exit_code == 0, result.output
    return out


def _rows(out: Path) -> dict[str, dict]:
    return {row["cell"]: row for row in json.loads((out / "report.json").read_text())["rows"]}


def test_the_report_covers_every_method_and_kv_dtype_asked_for(small_report):
    rows = _rows(small_report)
    assert list(rows) == ["fp16/fp16", "fp16/int4", "rtn/fp16", "rtn/int4", "bnb-nf4/fp16", "bnb-nf4/int4"]
    assert "turbo does not run bitsandbytes" in rows["bnb-nf4/int4"]["reason"]
    measured = {cell: row for cell, row in rows.items() if row["status"] == "measured"}
    assert len(measured) == 5 and rows["bnb-nf4/fp16"]["engine"] == "transformers"
    # The KV dtype really counts: same weights, another cache, another perplexity and capacity.
    assert measured["rtn/int4"]["perplexity"] != measured["rtn/fp16"]["perplexity"]
    assert measured["rtn/int4"]["sequences_that_fit"] > 2 * measured["rtn/fp16"]["sequences_that_fit"]
    assert measured["rtn/fp16"]["weight_bytes_memory"] < 0.6 * measured["fp16/fp16"]["weight_bytes_memory"]
    for row in measured.values():
        assert row["environment"]["torch"] and row["environment"]["device"] == "cpu"
        assert row["commands"][0].startswith("lmc eval ppl") and row["commands"][1].startswith("lmc eval task")
        assert row["tasks"]["heldout-choice"]["num_items"] == 6
    assert rows["rtn/fp16"]["seeds"] == {"calibration": 42}
    assert rows["rtn/fp16"]["quantize_command"].startswith("lmc quantize ")
    for name in ("report.md", "report.html", "report.png", "cells/model-rtn.json", "cells/eval-rtn-int4.json"):
        assert (small_report / name).is_file()


def _run_recorded(command: str, json_path: Path) -> dict:
    words = shlex.split(command)
    assert words[0] == "lmc"
    result = _invoke([*words[1:], "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    return json.loads(json_path.read_text())


@pytest.mark.parametrize("cell", ["rtn/int4", "bnb-nf4/fp16"])
def test_report_numbers_equal_single_lmc_eval_runs_of_the_recorded_commands(small_report, tmp_path, cell):
    row = _rows(small_report)[cell]
    ppl_command, task_command = row["commands"]
    ppl = _run_recorded(ppl_command, tmp_path / "ppl.json")
    assert {key: ppl[key] for key in row["perplexity_detail"]} == row["perplexity_detail"]
    task = _run_recorded(task_command, tmp_path / "task.json")
    expected = row["tasks"]["heldout-choice"]
    assert {key: task[key] for key in expected} == expected


def test_a_rerun_reuses_every_finished_cell(small_report, reference_paths, monkeypatch):
    before = _snapshot(small_report / "cells")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished cell was recomputed")

    monkeypatch.setattr(matrix, "open_engine", must_not_run)
    monkeypatch.setattr(matrix.bnb, "quantize_bnb", must_not_run)
    monkeypatch.setattr("lmcompress.pipeline.quantize_checkpoint", must_not_run)
    result = _invoke(_report_args(reference_paths, small_report, "fp16,rtn,bnb-nf4", "fp16,int4"))
    assert result.exit_code == 0, result.output
    assert _snapshot(small_report / "cells") == before


@pytest.mark.parametrize("methods, kv, eval_data, bad_task, message", [
    ("fp16,awk", "fp16", None, False, "unknown method awk in --methods; use a comma list of fp16, rtn, awq"),
    ("fp16", "fp16,fp8", None, False, "KV cache dtype 'fp8' is not one turbo has; use one of bf16, fp16, fp32, int4"),
    ("fp16", "fp16", "missing.txt", False, "evaluation data missing.txt not found; pass --eval-data PATH"),
    ("fp16", "fp16", None, True, "bad.jsonl line 2: 'gold' must be an integer index into the 2 choices"),
])
def test_bad_input_is_one_line_and_loses_nothing(small_report, reference_paths, tmp_path, methods, kv, eval_data,
                                                 bad_task, message):
    task_file = tmp_path / "bad.jsonl"
    task_file.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n'
                         '{"context": "a", "choices": [" b", " c"], "gold": 5}\n')
    before = _snapshot(small_report)
    extra = ["--task", str(task_file)] if bad_task else []
    result = _invoke(_report_args(reference_paths, small_report, methods, kv, *extra, eval_data=eval_data))
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert _snapshot(small_report) == before


def test_an_interrupted_report_resumes_where_it_stopped(reference_paths, tmp_path, monkeypatch):
    out = tmp_path / "report"
    args = _report_args(reference_paths, out, "fp16", "fp16,int8,int4")
    real_open_engine = matrix.open_engine
    opened: list[str] = []

    def interrupt_on_the_second_cell(model_dir, kv, *rest):
        opened.append(kv)
        if len(opened) == 2:
            raise KeyboardInterrupt
        return real_open_engine(model_dir, kv, *rest)

    monkeypatch.setattr(matrix, "open_engine", interrupt_on_the_second_cell)
    assert _invoke(args).exit_code == 130
    assert sorted(p.name for p in (out / "cells").glob("*.json")) == ["eval-fp16-fp16.json", "model-fp16.json"]
    assert not list((out / "cells").glob(".*"))  # no temporary file left behind

    def record(model_dir, kv, *rest):
        opened.append(kv)
        return real_open_engine(model_dir, kv, *rest)

    opened.clear()
    monkeypatch.setattr(matrix, "open_engine", record)
    result = _invoke(args)
    assert result.exit_code == 0, result.output
    assert opened == ["int8", "int4"]  # only the cells that had not finished
    assert [row["status"] for row in _rows(out).values()] == ["measured"] * 3

    # Changed settings never reuse numbers made under the old ones.
    opened.clear()
    assert _invoke([*args, "--task-limit", "4"]).exit_code == 0
    assert opened == ["float16", "int8", "int4"]
    assert {row["tasks"]["heldout-choice"]["num_items"] for row in _rows(out).values()} == {4}


def test_method_and_kv_lists_are_checked_and_deduplicated():
    assert parse_methods(" awq, fp16,awq ") == ("awq", "fp16")
    assert parse_kv_dtypes("fp16,int4,float16") == ("float16", "int4")
    with pytest.raises(LmcError, match=r"unknown method \(none\)"):
        parse_methods(" , ")


def test_cells_are_reused_only_under_the_same_fingerprint_and_fields(tmp_path):
    store = CellStore(tmp_path / "cells")
    cell = ModelCell(method="rtn", model_dir="/m", engine="turbo", weight_bytes_disk=1, weight_bytes_memory=2,
                     memory_basis="b", quantize_seconds=1.5, quantize_peak_gpu_bytes=None,
                     quantize_command="lmc quantize", seeds={},
                     environment={})
    store.save("model-rtn", "fp-1", cell)
    assert store.load("model-rtn", "fp-1", ModelCell) == cell
    assert store.load("model-rtn", "fp-2", ModelCell) is None and store.load("model-awq", "fp-1", ModelCell) is None
    assert store.load("model-rtn", "fp-1", EvalCell) is None  # another cell layout: recompute, do not crash
    (tmp_path / "cells" / "eval-z.json").write_text('{"fingerprint": "fp-1", "cell": ')  # torn by a crash
    assert store.load("eval-z", "fp-1", EvalCell) is None


def test_bench_results_take_numbers_or_lmc_bench_serve_and_throughput_result_files(tmp_path):
    (tmp_path / "bench-awq.json").write_text(json.dumps({"config": {}, "output_throughput": 812.5, "requests": []}))
    (tmp_path / "throughput-rtn.json").write_text(json.dumps({  # lmc bench throughput --json
        "bench": "throughput", "memory": {"weight_bytes": 1},
        "throughput": {"output_tok_s": 95.25, "total_tok_s": 190.5},
    }))
    results = tmp_path / "bench.json"
    results.write_text(json.dumps({"fp16/fp16": 301, "awq/int8": "bench-awq.json", "rtn/int4": "throughput-rtn.json"}))
    assert load_bench_results(results) == {"fp16/fp16": 301.0, "awq/int8": 812.5, "rtn/int4": 95.25}
    (tmp_path / "other.json").write_text(json.dumps({"tokens_per_second": 5.0}))
    results.write_text(json.dumps({"awq/int8": "other.json"}))
    with pytest.raises(LmcError, match="awq/int8 must be positive tokens/s or the path of an lmc bench serve"):
        load_bench_results(results)
    results.write_text(json.dumps({"awq/int8": -1}))
    with pytest.raises(LmcError, match="awq/int8 must be positive tokens/s"):
        load_bench_results(results)
    results.write_text(json.dumps({"awq/int8": "missing.json"}))
    with pytest.raises(LmcError, match="missing.json"):
        load_bench_results(results)
