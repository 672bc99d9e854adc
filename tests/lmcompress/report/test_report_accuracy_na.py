"""lmc report where accuracy is not applicable: a random-weight checkpoint, or --no-accuracy on any model.

The accuracy cells read n/a and no engine is opened to score anything; the memory
columns are the same numbers a scored report gives.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from lmcompress.cli.main import cli
from lmcompress.reference.dummy import LLAMA2_7B, has_dummy_weights, write_dummy_checkpoint
from lmcompress.report import matrix

# Llama-2-7B's config with tiny sizes: every in_features divisible by the group size, the reference tokenizer's vocab.
TINY_LLAMA2 = dict(LLAMA2_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=8192, max_position_embeddings=1024)
CALIB = ["--calib-samples", "2", "--calib-seqlen", "64", "--device", "cpu"]


def _invoke(args: list[str]):
    return CliRunner().invoke(cli, [str(arg) for arg in args])


def _rows(out: Path) -> dict[str, dict]:
    return {row["cell"]: row for row in json.loads((out / "report.json").read_text())["rows"]}


def _never_scores(*args, **kwargs):
    raise AssertionError("an engine was opened to score a cell whose accuracy is not applicable")


@pytest.fixture(scope="module")
def dummy_report(tmp_path_factory, reference_paths) -> Path:
    """A report of a random-weight checkpoint, given no --eval-data; no engine may be opened."""
    model_dir, _, calib = reference_paths
    tmp = tmp_path_factory.mktemp("dummy")
    source = write_dummy_checkpoint(tmp / "llama2-tiny-dummy", TINY_LLAMA2, tokenizer_dir=model_dir)
    out = tmp / "report"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(matrix, "open_engine", _never_scores)
        result = _invoke(["report", source, "--methods", "fp16,rtn,bnb-nf4", "--kv", "fp16,int4", "--out", out,
                          "--calib-data", calib, *CALIB])
    assert result.exit_code == 0, result.output
    assert "accuracy n/a (random weights)" in result.output
    return out


def test_random_weights_leave_accuracy_n_a_and_measure_the_memory_columns(dummy_report):
    rows = _rows(dummy_report)
    measured = {cell: row for cell, row in rows.items() if row["status"] == "measured"}
    assert list(measured) == ["fp16/fp16", "fp16/int4", "rtn/fp16", "rtn/int4", "bnb-nf4/fp16"]
    for row in measured.values():
        assert row["perplexity"] is None and row["perplexity_detail"] == {} and row["tasks"] == {}
        assert row["commands"] == []  # nothing to recompute with lmc eval
        assert row["weight_bytes_disk"] > 0 and row["weight_bytes_memory"] > 0 and row["sequences_that_fit"] > 0
    # The memory columns still tell the methods apart: RTN packs the layer's linears to half a byte per
    # weight plus an fp16 scale and a uint8 zero per 128 (embeddings and head stay fp16) ...
    linears = 2 * 256 * 256 + 2 * 128 * 256 + 3 * 256 * 512  # q, o; k, v; gate, up, down
    saved = measured["fp16/fp16"]["weight_bytes_memory"] - measured["rtn/fp16"]["weight_bytes_memory"]
    assert saved == 2 * linears - (linears // 2 + linears // 128 * 3)
    # ... and KV dtypes: K and V of 1 layer x 2 heads of 64, in fp16 or as 4-bit codes + fp16 scale and zero.
    assert measured["rtn/fp16"]["kv_bytes_per_token"] == 2 * 2 * 64 * 2
    assert measured["rtn/int4"]["kv_bytes_per_token"] == 2 * 2 * (32 + 4)
    assert measured["rtn/fp16"]["quantize_seconds"] > 0 and measured["bnb-nf4/fp16"]["engine"] == "transformers"
    assert "turbo does not run bitsandbytes" in rows["bnb-nf4/int4"]["reason"]
    report = json.loads((dummy_report / "report.json").read_text())
    assert report["accuracy_na"] == "random weights" and report["pareto_frontier"] == []


def test_the_random_weights_mark_travels_into_every_quantized_model(dummy_report):
    assert all(has_dummy_weights(dummy_report / "models" / method) for method in ("rtn", "bnb-nf4"))


def test_the_four_files_mark_the_accuracy_cells_n_a(dummy_report):
    markdown = (dummy_report / "report.md").read_text()
    assert "| fp16 | int4 | turbo |" in markdown
    fp16_int4 = next(line for line in markdown.splitlines() if line.startswith("| fp16 | int4 |"))
    assert fp16_int4.count("| n/a (random weights) ") == 3  # perplexity, vs fp16, task
    page = (dummy_report / "report.html").read_text()
    assert page.count("<td>n/a (random weights)</td>") == 5 * 3 and 'id="accuracy-na"' in page
    image = Image.open(dummy_report / "report.png")
    assert image.format == "PNG" and len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50


def test_no_accuracy_on_the_reference_model_needs_no_eval_data_and_scores_nothing(reference_paths, tmp_path,
                                                                                  monkeypatch):
    model_dir, _, _ = reference_paths
    out = tmp_path / "report"
    args = ["report", model_dir, "--methods", "fp16", "--kv", "fp16,int8", "--out", out, "--device", "cpu"]
    refused = _invoke(args)
    assert refused.exit_code == 2 and "pass --eval-data PATH" in refused.output and "or --no-accuracy" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not out.exists()

    monkeypatch.setattr(matrix, "open_engine", _never_scores)
    result = _invoke([*args, "--no-accuracy"])
    assert result.exit_code == 0, result.output
    rows = _rows(out)
    # The reference model: 8 layers x 2 KV heads of 64; float16 K and V, or int8 codes + fp16 scale and zero.
    assert [row["kv_bytes_per_token"] for row in rows.values()] == [2 * 8 * 2 * 64 * 2, 2 * 8 * 2 * (64 + 4)]
    assert {row["perplexity"] for row in rows.values()} == {None}
    assert rows["fp16/fp16"]["weight_bytes_memory"] == rows["fp16/int8"]["weight_bytes_memory"] > 30 * 1024**2
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy_na"] == "--no-accuracy" and report["command"].endswith("--no-accuracy")
    assert "| n/a (--no-accuracy) | n/a (--no-accuracy) | n/a (--no-accuracy) |" in (out / "report.md").read_text()
