"""The report's rows and its four files: report.json, report.md, report.html (self-contained) and report.png.

One row per (method, KV dtype) cell.  The plot puts each measured row at
x = weights in memory + the KV cache of one --context-token sequence, y = perplexity;
the Pareto frontier joins the rows that no other row beats on both (less or equal
memory and lower perplexity).  Where accuracy is not applicable (random weights,
--no-accuracy) the accuracy cells read "n/a (<why>)", there is no frontier, and the
plot shows instead how many --context-token sequences each cell fits on --gpu-mem.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from lmcompress.cli.options import human_bytes
from lmcompress.reference.dummy import DUMMY_WEIGHTS_KEY
from lmcompress.report.engines import short_kv_name
from lmcompress.report.files import write_bytes_atomic, write_json_atomic
from lmcompress.report.matrix import FLOAT_METHOD, RANDOM_WEIGHTS, MatrixResult, ReportConfig

NOT_MEASURED = "not measured"
ENGINE_NOTES = {
    "turbo": "turbo model runner, KV cache in the column's dtype (int8/int4: per token and head, online)",
    "transformers": "transformers + bitsandbytes, float16 compute and KV (turbo does not run bitsandbytes weights)",
}


@dataclass
class Row:
    cell: str  # "method/kv"
    method: str
    kv_cache_dtype: str  # short name: fp16, int8, int4
    status: str  # "measured" or "skipped"
    reason: str | None = None
    engine: str | None = None
    weight_bytes_disk: int | None = None
    weight_bytes_memory: int | None = None
    kv_bytes_per_token: int | None = None
    sequences_that_fit: int | None = None
    memory_for_one_sequence: int | None = None  # weights in memory + KV of one context-length sequence
    perplexity: float | None = None  # None where accuracy is not applicable
    perplexity_increase_pct: float | None = None  # against the fp16 weights / fp16 KV row
    perplexity_detail: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)  # task name -> {acc, acc_norm, num_items, sha256}
    quantize_seconds: float | None = None
    quantize_peak_gpu_bytes: int | None = None
    decode_tokens_per_s: float | str = NOT_MEASURED
    engine_note: str | None = None
    quantize_command: str | None = None
    commands: list[str] = field(default_factory=list)
    seeds: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)


@dataclass
class Report:
    command: str
    created: str
    source: str
    settings: dict
    environment: dict
    accuracy_na: str | None  # why the accuracy columns are not applicable, e.g. "random weights"
    baseline: str | None
    pareto_frontier: list[str]
    rows: list[Row]

    def measured(self) -> list[Row]:
        return [row for row in self.rows if row.status == "measured"]

    def scored(self) -> list[Row]:
        """Measured rows with a perplexity: the ones the accuracy-against-memory plot and frontier use."""
        return [row for row in self.measured() if row.perplexity is not None]


def build_report(config: ReportConfig, result: MatrixResult, command: str) -> Report:
    rows = [_row(config, result, method, kv) for method in config.methods for kv in config.kv_dtypes]
    baseline = next((row for row in rows if row.method == FLOAT_METHOD and row.kv_cache_dtype == "fp16"
                     and row.perplexity is not None), None)
    for row in rows:
        if baseline is not None and row.perplexity is not None:
            row.perplexity_increase_pct = 100 * (row.perplexity / baseline.perplexity - 1)
    settings = asdict(config) | {"src": str(config.src), "out": str(config.out)}
    return Report(
        command=command, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=str(config.src),
        settings=json.loads(json.dumps(settings, default=str)), environment=result.environment,
        accuracy_na=result.accuracy_na, baseline=baseline.cell if baseline else None,
        pareto_frontier=pareto_frontier(rows), rows=rows,
    )


def _row(config: ReportConfig, result: MatrixResult, method: str, kv: str) -> Row:
    cell = f"{method}/{short_kv_name(kv)}"
    skipped = next((s for s in result.skipped if s.method == method and s.kv_cache_dtype in (None, kv)), None)
    if skipped is not None:
        return Row(cell=cell, method=method, kv_cache_dtype=short_kv_name(kv), status="skipped", reason=skipped.reason)
    model, evaluation = result.models[method], result.evals[(method, kv)]
    budget = config.budget
    return Row(
        cell=cell, method=method, kv_cache_dtype=short_kv_name(kv), status="measured", engine=evaluation.engine,
        weight_bytes_disk=model.weight_bytes_disk, weight_bytes_memory=model.weight_bytes_memory,
        kv_bytes_per_token=evaluation.kv_bytes_per_token,
        sequences_that_fit=budget.sequences_that_fit(model.weight_bytes_memory, evaluation.kv_bytes_per_token),
        memory_for_one_sequence=model.weight_bytes_memory + budget.kv_bytes_per_sequence(evaluation.kv_bytes_per_token),
        perplexity=evaluation.perplexity["ppl"] if evaluation.perplexity else None,
        perplexity_detail=evaluation.perplexity or {}, tasks={task["task"]: task for task in evaluation.tasks},
        quantize_seconds=model.quantize_seconds, quantize_peak_gpu_bytes=model.quantize_peak_gpu_bytes,
        decode_tokens_per_s=config.decode_tokens_per_s.get(cell, NOT_MEASURED),
        engine_note=ENGINE_NOTES[evaluation.engine], quantize_command=model.quantize_command,
        commands=evaluation.commands, seeds=model.seeds, environment=model.environment | evaluation.environment,
    )


def pareto_frontier(rows: list[Row]) -> list[str]:
    """Cells of the scored rows that no other row beats: in order of increasing memory, decreasing perplexity."""
    measured = sorted((row for row in rows if row.status == "measured" and row.perplexity is not None),
                      key=lambda row: (row.memory_for_one_sequence, row.perplexity))
    frontier, best = [], float("inf")
    for row in measured:
        if row.perplexity < best:
            frontier.append(row.cell)
            best = row.perplexity
    return frontier


def write_report(report: Report, config: ReportConfig, out: Path) -> dict[str, Path]:
    """Write the four files atomically; returns their paths by kind."""
    png = plot_png(report, config)
    paths = {kind: out / f"report.{kind}" for kind in ("json", "md", "html", "png")}
    write_bytes_atomic(paths["png"], png)
    write_json_atomic(paths["json"], asdict(report))
    write_bytes_atomic(paths["md"], render_markdown(report, config).encode())
    write_bytes_atomic(paths["html"], render_html(report, config, png).encode())
    return paths


# --- the plot -------------------------------------------------------------------------

_KV_MARKERS = {"fp16": "o", "bf16": "D", "fp32": "P", "int8": "s", "int4": "^"}


def plot_png(report: Report, config: ReportConfig) -> bytes:
    """PNG bytes (Agg, no display): perplexity against memory; where no row has a perplexity
    (accuracy not applicable), the sequences each cell fits on the GPU; a note where nothing was measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = {method: f"C{index}" for index, method in enumerate(config.methods)}
    if report.scored():
        _plot_accuracy_against_memory(axes, report, config, colors)
    elif report.measured():
        _plot_capacity(axes, report, config, colors)
    else:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "No cell was measured: every cell was skipped (the table says why).",
                  ha="center", va="center", transform=axes.transAxes)
        axes.set_title(f"lmc report: {Path(report.source).name}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _plot_accuracy_against_memory(axes, report: Report, config: ReportConfig, colors: dict[str, str]) -> None:
    """Perplexity against memory (weights + one sequence's KV), frontier joined.

    Colour is the method, marker shape the KV dtype; cells that land on (nearly)
    the same spot share one label, their names stacked.
    """
    from matplotlib.lines import Line2D

    rows = report.scored()
    unit, scale = _memory_unit(rows)
    points = {row.cell: (row.memory_for_one_sequence / scale, row.perplexity) for row in rows}
    for row in rows:
        axes.scatter(*points[row.cell], s=60, color=colors[row.method],
                     marker=_KV_MARKERS.get(row.kv_cache_dtype, "o"), zorder=3)
    for (x, y), cells in _label_groups(points):
        stacked = sorted(cells, key=lambda cell: -points[cell][1])  # top line for the highest point
        axes.annotate("\n".join(stacked), (x, y), fontsize=8, xytext=(7, 4), textcoords="offset points",
                      va="bottom")
    frontier = [points[cell] for cell in report.pareto_frontier]
    handles = _method_handles(rows, colors)
    handles += [Line2D([], [], color="gray", marker=_KV_MARKERS.get(kv, "o"), linestyle="", label=f"KV {kv}")
                for kv in dict.fromkeys(row.kv_cache_dtype for row in rows)]
    if frontier:
        axes.step(*zip(*frontier), where="post", color="black", linewidth=1.2, linestyle="--", zorder=2)
        axes.scatter(*zip(*frontier), s=170, facecolors="none", edgecolors="black", zorder=4)
        handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markerfacecolor="none",
                              label="Pareto frontier"))
    axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.set_xlabel(f"memory: weights + KV of one {config.budget.context}-token sequence ({unit})")
    axes.set_ylabel("perplexity (lower is better)")
    axes.set_title(f"Accuracy against memory: {Path(report.source).name}")
    axes.grid(True, alpha=0.3)


def _plot_capacity(axes, report: Report, config: ReportConfig, colors: dict[str, str]) -> None:
    """One bar per measured cell: the --context-token sequences whose KV fits on --gpu-mem beside its weights.

    Drawn where accuracy is not applicable, so the title says why perplexity is missing.
    """
    rows = report.measured()
    budget = config.budget
    positions = range(len(rows))
    bars = axes.barh(positions, [row.sequences_that_fit for row in rows], color=[colors[row.method] for row in rows])
    axes.set_yticks(positions, [row.cell for row in rows], fontsize=8)
    axes.invert_yaxis()  # first row on top, as in the table
    for bar, row in zip(bars, rows):
        decode = "" if isinstance(row.decode_tokens_per_s, str) else f", {row.decode_tokens_per_s:,.0f} tok/s"
        axes.annotate(f" {row.sequences_that_fit:,}  (weights {human_bytes(row.weight_bytes_memory)}, "
                      f"KV {row.kv_bytes_per_token:,} B/token{decode})",
                      (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=7)
    axes.set_xlim(0, 1.6 * max(1, max(row.sequences_that_fit for row in rows)))  # room for the labels
    axes.legend(handles=_method_handles(rows, colors), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    axes.set_xlabel(f"concurrent {budget.context}-token sequences whose KV fits on {human_bytes(budget.gpu_bytes)} "
                    f"after the weights and a {human_bytes(budget.activation_reserve_bytes)} reserve")
    axes.set_title(f"Capacity: {Path(report.source).name}\n{_accuracy_na_sentence(report)}; "
                   "no perplexity, so no accuracy-against-memory plot", fontsize=9)
    axes.grid(True, axis="x", alpha=0.3)


def _method_handles(rows: list[Row], colors: dict[str, str]) -> list:
    from matplotlib.lines import Line2D

    return [Line2D([], [], color=colors[m], marker="o", linestyle="", label=m)
            for m in dict.fromkeys(row.method for row in rows)]


def _accuracy_na_sentence(report: Report) -> str:
    if report.accuracy_na == RANDOM_WEIGHTS:
        return f"Accuracy not applicable: the weights are random (config.json has {DUMMY_WEIGHTS_KEY})"
    return f"Accuracy not computed ({report.accuracy_na})"


def _label_groups(points: dict[str, tuple[float, float]]) -> list[tuple[tuple[float, float], list[str]]]:
    """Cells grouped when within 2% of the x range and 3% of the y range of a group's first point."""
    if not points:
        return []
    xs, ys = [x for x, _ in points.values()], [y for _, y in points.values()]
    near_x, near_y = 0.02 * (max(xs) - min(xs) or 1.0), 0.03 * (max(ys) - min(ys) or 1.0)
    groups: list[tuple[tuple[float, float], list[str]]] = []
    for cell, (x, y) in sorted(points.items(), key=lambda item: item[1]):
        for (gx, gy), cells in groups:
            if abs(x - gx) <= near_x and abs(y - gy) <= near_y:
                cells.append(cell)
                break
        else:
            groups.append(((x, y), [cell]))
    return groups


def _memory_unit(rows: list[Row]) -> tuple[str, int]:
    largest = max((row.memory_for_one_sequence for row in rows), default=0)
    return ("GiB", 1024**3) if largest >= 1024**3 else ("MiB", 1024**2)


# --- tables ---------------------------------------------------------------------------


def _headers(report: Report, config: ReportConfig) -> list[str]:
    return [
        "method", "KV", "engine", "weights on disk", "weights in memory", "KV / token",
        f"sequences of {config.budget.context} on {human_bytes(config.budget.gpu_bytes)}", "perplexity",
        "vs fp16", *[f"{name} acc / acc_norm" for name in _task_names(report)], "quantize time",
        *(["quantize peak GPU memory"] if _has_gpu_peaks(report) else []), "decode tok/s",
    ]


def _task_names(report: Report) -> list[str]:
    """Task columns: those scored, or one "task" column marked n/a where accuracy is not applicable."""
    names = list(dict.fromkeys(name for row in report.measured() for name in row.tasks))
    return names or (["task"] if report.accuracy_na else [])


def _has_gpu_peaks(report: Report) -> bool:
    return any(row.quantize_peak_gpu_bytes is not None for row in report.rows)


def _cells(row: Row, report: Report) -> list[str]:
    if row.status == "skipped":
        return [row.method, row.kv_cache_dtype, f"skipped: {row.reason}"]
    if report.accuracy_na:
        accuracy = [f"n/a ({report.accuracy_na})"] * (2 + len(_task_names(report)))
    else:
        accuracy = [f"{row.perplexity:.3f}", _increase(row, report.baseline), *_task_cells(row, report)]
    peak = "-" if row.quantize_peak_gpu_bytes is None else human_bytes(row.quantize_peak_gpu_bytes)
    decode = row.decode_tokens_per_s if isinstance(row.decode_tokens_per_s, str) else f"{row.decode_tokens_per_s:.1f}"
    return [
        row.method, row.kv_cache_dtype, row.engine, human_bytes(row.weight_bytes_disk),
        human_bytes(row.weight_bytes_memory), f"{row.kv_bytes_per_token:,} B", f"{row.sequences_that_fit:,}",
        *accuracy, "-" if row.quantize_seconds is None else f"{row.quantize_seconds:.1f} s",
        *([peak] if _has_gpu_peaks(report) else []), decode,
    ]


def _increase(row: Row, baseline: str | None) -> str:
    if row.cell == baseline:
        return "baseline"
    return "-" if row.perplexity_increase_pct is None else f"{row.perplexity_increase_pct:+.2f}%"


def _task_cells(row: Row, report: Report) -> list[str]:
    return [f"{row.tasks[name]['acc']:.3f} / {row.tasks[name]['acc_norm']:.3f}" if name in row.tasks else "-"
            for name in _task_names(report)]


_PEAK_NOTE = ("Quantize peak GPU memory: torch.cuda.max_memory_allocated() over the quantization (the whole "
              "lmc quantize run for rtn/awq/gptq, loading with quantization for bitsandbytes).")


def _notes(report: Report, config: ReportConfig) -> list[str]:
    budget = config.budget
    return [
        _accuracy_note(report, config),
        f"Sequences that fit: (GPU memory {human_bytes(budget.gpu_bytes)} - weights in memory - activation reserve "
        f"{human_bytes(budget.activation_reserve_bytes)}) / KV of one {budget.context}-token sequence, "
        f"counted in whole {budget.block_size}-token KV blocks.",
        "Weights in memory: as turbo holds them serving in float16 (4-bit linears packed), or for bitsandbytes "
        "the parameters, buffers and quantization state (NF4 absmax, int8 row scales) transformers holds.",
        *[f"Engine {name}: {note}." for name, note in ENGINE_NOTES.items()
          if any(row.engine == name for row in report.rows)],
        *([] if report.accuracy_na else
          [f"Pareto frontier (memory against perplexity): {', '.join(report.pareto_frontier) or 'none'}."]),
        *([_PEAK_NOTE] if _has_gpu_peaks(report) else []),
        "decode tok/s: from --bench-results (a number, or a benchmark result file's output_throughput), "
        "else not measured.",
    ]


def _accuracy_note(report: Report, config: ReportConfig) -> str:
    if report.accuracy_na:
        return (f"{_accuracy_na_sentence(report)}. Perplexity and task accuracy were not computed, so every "
                "accuracy cell reads n/a and there is no Pareto frontier; the memory, capacity and quantize-time "
                "columns are measured as usual.")
    scored = report.scored()
    if not scored:
        return "No cell was measured."
    detail = scored[0].perplexity_detail
    return (f"Perplexity: sliding windows of {detail['max_length']} tokens every {detail['stride']} over "
            f"{detail['num_tokens']:,} scored tokens of {config.eval_data}; vs fp16 is the change against "
            f"{report.baseline or 'the fp16/fp16 row (not in this report)'}.")


def _plot_caption(report: Report) -> str:
    if report.accuracy_na:
        return f"sequences that fit per cell; accuracy n/a ({report.accuracy_na})"
    return "accuracy against memory"


def render_markdown(report: Report, config: ReportConfig) -> str:
    headers = _headers(report, config)
    lines = [f"# lmc report: {Path(report.source).name}", "", f"![{_plot_caption(report)}](report.png)", "",
             *([_accuracy_note(report, config), ""] if report.accuracy_na else []),
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in report.rows:
        cells = _cells(row, report)
        lines.append("| " + " | ".join(cells + [""] * (len(headers) - len(cells))) + " |")
    lines += ["", *[f"- {note}" for note in _notes(report, config)], "", "## Reproduce", "",
              f"    {report.command}", ""]
    for row in report.measured():
        commands = filter(None, [row.quantize_command, *row.commands])
        lines += [f"{row.cell}:", "", *[f"    {line}" for line in commands], ""]
    env = report.environment
    lines += ["## Environment", "", ", ".join(f"{key} {value}" for key, value in env.items()), ""]
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; }
td.text { text-align: left; }
tr.frontier td { background: #eef7ee; }
tr.skipped td { color: #888; font-style: italic; }
code { font-size: 0.85em; }
pre { white-space: pre-wrap; word-break: break-all; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def render_html(report: Report, config: ReportConfig, png: bytes) -> str:
    headers = _headers(report, config)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join(_html_row(row, len(headers), report) for row in report.rows)
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in _notes(report, config))
    commands = "".join(
        f"<li>{html.escape(row.cell)}<pre><code>"
        f"{html.escape(chr(10).join(filter(None, [row.quantize_command, *row.commands])))}</code></pre></li>"
        for row in report.measured())
    image = base64.b64encode(png).decode()
    banner = f'<p id="accuracy-na">{html.escape(_accuracy_note(report, config))}</p>' if report.accuracy_na else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmc report: {html.escape(Path(report.source).name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>lmc report: {html.escape(Path(report.source).name)}</h1>
<p><img id="plot" alt="{html.escape(_plot_caption(report))}" src="data:image/png;base64,{image}"></p>
{banner}
<table id="report"><thead><tr>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<ul>{notes}</ul>
<h2>Reproduce</h2>
<pre><code>{html.escape(report.command)}</code></pre>
<details><summary>per-cell commands</summary><ul>{commands}</ul></details>
<h2>Environment</h2>
<p>{html.escape(", ".join(f"{key} {value}" for key, value in report.environment.items()))}</p>
</body></html>
"""


def _html_row(row: Row, width: int, report: Report) -> str:
    cells = _cells(row, report)
    css = "skipped" if row.status == "skipped" else ("frontier" if row.cell in report.pareto_frontier else "")
    tds = [f'<td class="text">{html.escape(c)}</td>' for c in cells[:3]]
    if row.status == "skipped":
        tds[-1] = f'<td class="text" colspan="{width - 2}">{html.escape(cells[2])}</td>'
    tds += [f"<td>{html.escape(c)}</td>" for c in cells[3:]]
    return f'<tr class="{css}" data-cell="{html.escape(row.cell)}">{"".join(tds)}</tr>'
