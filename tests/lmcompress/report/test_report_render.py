"""The report's rows, Pareto frontier and four files, from hand-made cells; report.html in headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lmcompress.report.matrix import RANDOM_WEIGHTS, EvalCell, MatrixResult, ModelCell, ReportConfig, Skipped
from lmcompress.report.memory import GpuBudget
from lmcompress.report.render import NOT_MEASURED, Row, build_report, pareto_frontier, render_markdown, write_report

MIB = 1024**2
KV_PER_TOKEN = {"float16": 4096, "int4": 1280}


def _model(method: str, weight_bytes: int, seconds: float | None, peak_gpu_bytes: int | None = None) -> ModelCell:
    return ModelCell(method=method, model_dir=f"/m/{method}", engine="turbo", weight_bytes_disk=weight_bytes + 999,
                     weight_bytes_memory=weight_bytes, memory_basis="turbo", quantize_seconds=seconds,
                     quantize_peak_gpu_bytes=peak_gpu_bytes,
                     quantize_command=None if seconds is None else f"lmc quantize SRC /m/{method} --method {method}",
                     seeds={"calibration": 42}, environment={"torch": "x"})


def _eval(method: str, kv: str, ppl: float | None) -> EvalCell:
    """A scored cell, or with ppl None one whose accuracy is not applicable (no perplexity, no tasks)."""
    scored = ppl is not None
    return EvalCell(method=method, kv_cache_dtype=kv, engine="turbo", kv_bytes_per_token=KV_PER_TOKEN[kv],
                    perplexity={"ppl": ppl, "nll_mean": 2.0, "num_tokens": 1000, "max_length": 256, "stride": 128}
                    if scored else None,
                    tasks=[{"task": "heldout-choice", "acc": 0.75, "acc_norm": 0.7, "gold_loglikelihood": -30.0,
                            "num_items": 20, "sha256": "abc"}] if scored else [],
                    seconds=1.0, commands=[f"lmc eval ppl /m/{method} --kv-cache-dtype {kv}"] if scored else [],
                    environment={"torch": "x"})


@pytest.fixture
def config(tmp_path) -> ReportConfig:
    return ReportConfig(src=Path("/models/ref-llama"), out=tmp_path, methods=("fp16", "awq", "bnb-nf4"),
                        kv_dtypes=("float16", "int4"), eval_data="heldout.txt",
                        budget=GpuBudget(gpu_bytes=256 * MIB, context=1024, activation_reserve_bytes=16 * MIB),
                        decode_tokens_per_s={"awq/int4": 812.5})


def _result(perplexities: dict[tuple[str, str], float | None], accuracy_na: str | None = None,
            awq_peak_gpu_bytes: int | None = None) -> MatrixResult:
    return MatrixResult(
        models={"fp16": _model("fp16", 36 * MIB, None), "awq": _model("awq", 18 * MIB, 12.5, awq_peak_gpu_bytes)},
        evals={(method, kv): _eval(method, kv, ppl) for (method, kv), ppl in perplexities.items()},
        skipped=[Skipped("bnb-nf4", None, "bitsandbytes is not installed (pip install bitsandbytes==0.50.2)")],
        environment={"torch": "x", "device": "cpu"}, accuracy_na=accuracy_na,
    )


PERPLEXITIES = {("fp16", "float16"): 14.0, ("fp16", "int4"): 14.2, ("awq", "float16"): 14.1, ("awq", "int4"): 14.35}


@pytest.fixture
def result() -> MatrixResult:
    return _result(PERPLEXITIES)


@pytest.fixture
def random_weights_result() -> MatrixResult:
    """The same cells from a random-weight checkpoint: memory measured, accuracy not applicable."""
    return _result(dict.fromkeys(PERPLEXITIES), accuracy_na=RANDOM_WEIGHTS)


def test_rows_carry_memory_capacity_and_the_change_against_fp16(config, result):
    report = build_report(config, result, "lmc report ...")
    rows = {row.cell: row for row in report.rows}
    assert list(rows) == ["fp16/fp16", "fp16/int4", "awq/fp16", "awq/int4", "bnb-nf4/fp16", "bnb-nf4/int4"]
    assert report.baseline == "fp16/fp16"
    awq_int4 = rows["awq/int4"]
    # KV budget 256 - 18 - 16 = 222 MiB; one 1024-token int4 sequence takes 1024 * 1280 B = 1.25 MiB.
    assert awq_int4.sequences_that_fit == 177
    assert awq_int4.memory_for_one_sequence == 18 * MIB + 1024 * 1280
    assert awq_int4.perplexity_increase_pct == pytest.approx(100 * (14.35 / 14.0 - 1))
    assert awq_int4.decode_tokens_per_s == 812.5 and rows["awq/fp16"].decode_tokens_per_s == NOT_MEASURED
    assert rows["bnb-nf4/int4"].status == "skipped" and "not installed" in rows["bnb-nf4/int4"].reason


def _row(cell: str, memory: int, ppl: float) -> Row:
    method, kv = cell.split("/")
    return Row(cell=cell, method=method, kv_cache_dtype=kv, status="measured", memory_for_one_sequence=memory,
               perplexity=ppl)


def test_pareto_frontier_keeps_the_rows_nothing_beats_on_both_memory_and_perplexity():
    rows = [_row("fp16/fp16", 100, 10.0), _row("fp16/int4", 80, 10.1), _row("awq/fp16", 50, 10.3),
            _row("rtn/fp16", 50, 10.6), _row("rtn/int8", 60, 10.4), _row("awq/int4", 30, 10.5),
            Row(cell="bnb/int4", method="bnb", kv_cache_dtype="int4", status="skipped", reason="r")]
    assert pareto_frontier(rows) == ["awq/int4", "awq/fp16", "fp16/int4", "fp16/fp16"]


def test_the_four_files_hold_the_same_rows(config, result, tmp_path):
    report = build_report(config, result, "lmc report SRC --methods fp16,awq,bnb-nf4")
    paths = write_report(report, config, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert [row["cell"] for row in saved["rows"]] == [row.cell for row in report.rows]
    # fp16/int4 (37.25 MiB, 14.2) loses to awq/fp16 (22 MiB, 14.1) on both counts.
    assert saved["pareto_frontier"] == report.pareto_frontier == ["awq/int4", "awq/fp16", "fp16/fp16"]
    assert saved["rows"][3]["commands"] == ["lmc eval ppl /m/awq --kv-cache-dtype int4"]

    markdown = paths["md"].read_text()
    assert ("| awq | int4 | turbo | 18.0 MiB | 18.0 MiB | 1,280 B | 177 | 14.350 | +2.50% | 0.750 / 0.700 "
            "| 12.5 s | 812.5 |") in markdown
    assert "| fp16 | fp16 | turbo | 36.0 MiB | 36.0 MiB | 4,096 B | 51 | 14.000 | baseline |" in markdown
    assert "| bnb-nf4 | int4 | skipped: bitsandbytes is not installed" in markdown
    assert "![accuracy against memory](report.png)" in markdown

    page = paths["html"].read_text()
    assert page.count('<tr class="') == 6 and 'data-cell="awq/int4"' in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # self-contained: nothing fetched

    image = Image.open(paths["png"])
    assert image.format == "PNG" and image.width > 600
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # drawn, not blank


def _pixels_of(png: Path, rgb: tuple[int, int, int]) -> int:
    return sum(count for count, colour in Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20) if colour == rgb)


AWQ_COLOUR = (255, 127, 14)  # matplotlib's C1: awq, the second method of the config


def test_accuracy_cells_read_n_a_and_the_plot_shows_capacity_where_accuracy_is_not_applicable(
        config, result, random_weights_result, tmp_path):
    report = build_report(config, random_weights_result, "lmc report ...")
    assert report.accuracy_na == RANDOM_WEIGHTS and report.baseline is None and report.pareto_frontier == []
    rows = {row.cell: row for row in report.rows}
    assert rows["awq/int4"].perplexity is None and rows["awq/int4"].sequences_that_fit == 177
    paths = write_report(report, config, tmp_path / "random")

    markdown = paths["md"].read_text()
    assert ("| perplexity | vs fp16 | task acc / acc_norm | quantize time | decode tok/s |") in markdown
    assert ("| awq | int4 | turbo | 18.0 MiB | 18.0 MiB | 1,280 B | 177 | n/a (random weights) "
            "| n/a (random weights) | n/a (random weights) | 12.5 s | 812.5 |") in markdown
    assert "no Pareto frontier" in markdown and "Pareto frontier (memory against perplexity)" not in markdown
    saved = json.loads(paths["json"].read_text())
    assert saved["accuracy_na"] == RANDOM_WEIGHTS and {row["perplexity"] for row in saved["rows"]} == {None}
    page = paths["html"].read_text()
    assert 'id="accuracy-na"' in page and page.count("<td>n/a (random weights)</td>") == 12

    # Bars of capacity instead of perplexity points: awq's two rows fill far more pixels than its two markers.
    scored = write_report(build_report(config, result, "lmc report ..."), config, tmp_path / "scored")
    assert _pixels_of(paths["png"], AWQ_COLOUR) > 20 * _pixels_of(scored["png"], AWQ_COLOUR) > 0


def test_a_report_with_nothing_measured_still_writes_its_files(config, tmp_path):
    nothing = MatrixResult(models={}, evals={}, skipped=[Skipped(m, None, "r") for m in config.methods],
                           environment={"device": "cpu"})
    paths = write_report(build_report(config, nothing, "lmc report ..."), config, tmp_path)
    assert "No cell was measured." in paths["md"].read_text()
    assert len(Image.open(paths["png"]).convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # the note, not blank


def test_a_quantize_peak_gpu_memory_column_appears_where_one_was_measured(config, result):
    assert "quantize peak GPU memory" not in render_markdown(build_report(config, result, "lmc report"), config)
    measured = _result(PERPLEXITIES, awq_peak_gpu_bytes=3 * 1024**3)
    markdown = render_markdown(build_report(config, measured, "lmc report"), config)
    assert "| quantize time | quantize peak GPU memory | decode tok/s |" in markdown
    assert "| 12.5 s | 3.0 GiB | 812.5 |" in markdown and "| - | - | not measured |" in markdown


def _chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


_PROBE = """<script>addEventListener("load", () => {
  document.body.dataset.plotWidth = document.getElementById("plot").naturalWidth;
  document.body.dataset.tableRows = document.querySelectorAll("#report tbody tr").length;
});</script>"""


@pytest.mark.parametrize("cells", ["result", "random_weights_result"])
def test_report_html_renders_its_table_and_plot_in_headless_chromium(config, cells, request, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium)")
    paths = write_report(build_report(config, request.getfixturevalue(cells), "lmc report ..."), config, tmp_path)
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]

    probe = tmp_path / "probe.html"
    probe.write_text(paths["html"].read_text().replace("</body>", _PROBE + "</body>"))
    dom = subprocess.run([*flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert int(re.search(r'data-plot-width="(\d+)"', dom).group(1)) > 600
    assert re.search(r'data-table-rows="(\d+)"', dom).group(1) == "6"
    assert "awq/int4" in dom and "skipped: bitsandbytes is not installed" in dom
    # Four measured rows, three accuracy cells each (perplexity, vs fp16, task), n/a for random weights.
    assert dom.count("<td>n/a (random weights)</td>") == {"result": 0, "random_weights_result": 12}[cells]

    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1280,1600", f"--screenshot={shot}", paths["html"].as_uri()],
                   capture_output=True, timeout=120, check=True)
    pixels = Image.open(io.BytesIO(shot.read_bytes())).convert("L")
    dark = sum(count for count, value in pixels.getcolors() if value < 128)
    assert pixels.size == (1280, 1600) and dark > 0.01 * 1280 * 1600  # text, table lines and plot drawn
