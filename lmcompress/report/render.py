"""The report's rows and its four files: report.json, report.md, report.html (self-contained) and report.png.

One row per (method, KV dtype) cell.  The plot puts each measured row at
x = weights in memory + the KV cache of one --context-token sequence, y = perplexity;
the Pareto frontier joins the rows that no other row beats on both (less or equal
memory and lower perplexity).
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
from lmcompress.report.engines import short_kv_name
from lmcompress.report.files import write_bytes_atomic, write_json_atomic
from lmcompress.report.matrix import FLOAT_METHOD, MatrixResult, ReportConfig

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
    perplexity: float | None = None
    perplexity_increase_pct: float | None = None  # against the fp16 weights / fp16 KV row
    perplexity_detail: dict = field(default_factory=dict)
    tasks: dict = field(default_factory=dict)  # task name -> {acc, acc_norm, num_items, sha256}
    quantize_seconds: float | None = None
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
    baseline: str | None
    pareto_frontier: list[str]
    rows: list[Row]

    def measured(self) -> list[Row]:
        return [row for row in self.rows if row.status == "measured"]


def build_report(config: ReportConfig, result: MatrixResult, command: str) -> Report:
    rows = [_row(config, result, method, kv) for method in config.methods for kv in config.kv_dtypes]
    baseline = next((row for row in rows if row.method == FLOAT_METHOD and row.kv_cache_dtype == "fp16"
                     and row.status == "measured"), None)
    for row in rows:
        if baseline is not None and row.perplexity is not None:
            row.perplexity_increase_pct = 100 * (row.perplexity / baseline.perplexity - 1)
    settings = asdict(config) | {"src": str(config.src), "out": str(config.out)}
    return Report(
        command=command, created=datetime.now(timezone.utc).isoformat(timespec="seconds"), source=str(config.src),
        settings=json.loads(json.dumps(settings, default=str)), environment=result.environment,
        baseline=baseline.cell if baseline else None, pareto_frontier=pareto_frontier(rows), rows=rows,
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
        perplexity=evaluation.perplexity["ppl"], perplexity_detail=evaluation.perplexity,
        tasks={task["task"]: task for task in evaluation.tasks}, quantize_seconds=model.quantize_seconds,
        decode_tokens_per_s=config.decode_tokens_per_s.get(cell, NOT_MEASURED),
        engine_note=ENGINE_NOTES[evaluation.engine], quantize_command=model.quantize_command,
        commands=evaluation.commands, seeds=model.seeds, environment=model.environment | evaluation.environment,
    )


def pareto_frontier(rows: list[Row]) -> list[str]:
    """Cells of the measured rows that no other row beats: in order of increasing memory, decreasing perplexity."""
    measured = sorted((row for row in rows if row.status == "measured"),
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
    """Perplexity against memory (weights + one sequence's KV), frontier joined; PNG bytes (Agg, no display).

    Colour is the method, marker shape the KV dtype; cells that land on (nearly)
    the same spot share one label, their names stacked.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    figure = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows = report.measured()
    unit, scale = _memory_unit(rows)
    points = {row.cell: (row.memory_for_one_sequence / scale, row.perplexity) for row in rows}
    colors = {method: f"C{index}" for index, method in enumerate(config.methods)}
    for row in rows:
        axes.scatter(*points[row.cell], s=60, color=colors[row.method],
                     marker=_KV_MARKERS.get(row.kv_cache_dtype, "o"), zorder=3)
    for (x, y), cells in _label_groups(points):
        stacked = sorted(cells, key=lambda cell: -points[cell][1])  # top line for the highest point
        axes.annotate("\n".join(stacked), (x, y), fontsize=8, xytext=(7, 4), textcoords="offset points",
                      va="bottom")
    frontier = [points[cell] for cell in report.pareto_frontier]
    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="", label=m)
               for m in dict.fromkeys(row.method for row in rows)]
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


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
    task_names = _task_names(report)
    return [
        "method", "KV", "engine", "weights on disk", "weights in memory", "KV / token",
        f"sequences of {config.budget.context} on {human_bytes(config.budget.gpu_bytes)}", "perplexity",
        "vs fp16", *[f"{name} acc / acc_norm" for name in task_names], "quantize time", "decode tok/s",
    ]


def _task_names(report: Report) -> list[str]:
    return list(dict.fromkeys(name for row in report.measured() for name in row.tasks))


def _cells(row: Row, task_names: list[str], baseline: str | None) -> list[str]:
    if row.status == "skipped":
        return [row.method, row.kv_cache_dtype, f"skipped: {row.reason}"]
    tasks = [f"{row.tasks[name]['acc']:.3f} / {row.tasks[name]['acc_norm']:.3f}" if name in row.tasks else "-"
             for name in task_names]
    if row.cell == baseline:
        increase = "baseline"
    else:
        increase = "-" if row.perplexity_increase_pct is None else f"{row.perplexity_increase_pct:+.2f}%"
    decode = row.decode_tokens_per_s if isinstance(row.decode_tokens_per_s, str) else f"{row.decode_tokens_per_s:.1f}"
    return [
        row.method, row.kv_cache_dtype, row.engine, human_bytes(row.weight_bytes_disk),
        human_bytes(row.weight_bytes_memory), f"{row.kv_bytes_per_token:,} B", f"{row.sequences_that_fit:,}",
        f"{row.perplexity:.3f}", increase, *tasks,
        "-" if row.quantize_seconds is None else f"{row.quantize_seconds:.1f} s", decode,
    ]


def _notes(report: Report, config: ReportConfig) -> list[str]:
    budget = config.budget
    return [
        _perplexity_note(report, config),
        f"Sequences that fit: (GPU memory {human_bytes(budget.gpu_bytes)} - weights in memory - activation reserve "
        f"{human_bytes(budget.activation_reserve_bytes)}) / KV of one {budget.context}-token sequence, "
        f"counted in whole {budget.block_size}-token KV blocks.",
        "Weights in memory: as turbo holds them serving in float16 (4-bit linears packed), or transformers' "
        "get_memory_footprint() for bitsandbytes.",
        *[f"Engine {name}: {note}." for name, note in ENGINE_NOTES.items()
          if any(row.engine == name for row in report.rows)],
        f"Pareto frontier (memory against perplexity): {', '.join(report.pareto_frontier) or 'none'}.",
        "decode tok/s: from --bench-results (a number, or an lmc bench serve result's output token throughput), "
        "else not measured.",
    ]


def _perplexity_note(report: Report, config: ReportConfig) -> str:
    measured = report.measured()
    if not measured:
        return "No cell was measured."
    detail = measured[0].perplexity_detail
    return (f"Perplexity: sliding windows of {detail['max_length']} tokens every {detail['stride']} over "
            f"{detail['num_tokens']:,} scored tokens of {config.eval_data}; vs fp16 is the change against "
            f"{report.baseline or 'the fp16/fp16 row (not in this report)'}.")


def render_markdown(report: Report, config: ReportConfig) -> str:
    task_names = _task_names(report)
    headers = _headers(report, config)
    lines = [f"# lmc report: {Path(report.source).name}", "", "![accuracy against memory](report.png)", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in report.rows:
        cells = _cells(row, task_names, report.baseline)
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
    task_names = _task_names(report)
    headers = _headers(report, config)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "\n".join(_html_row(row, task_names, len(headers), report) for row in report.rows)
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in _notes(report, config))
    commands = "".join(
        f"<li>{html.escape(row.cell)}<pre><code>"
        f"{html.escape(chr(10).join(filter(None, [row.quantize_command, *row.commands])))}</code></pre></li>"
        for row in report.measured())
    image = base64.b64encode(png).decode()
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lmc report: {html.escape(Path(report.source).name)}</title>
<style>{_CSS}</style></head>
<body>
<h1>lmc report: {html.escape(Path(report.source).name)}</h1>
<p><img id="plot" alt="accuracy against memory" src="data:image/png;base64,{image}"></p>
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


def _html_row(row: Row, task_names: list[str], width: int, report: Report) -> str:
    cells = _cells(row, task_names, report.baseline)
    css = "skipped" if row.status == "skipped" else ("frontier" if row.cell in report.pareto_frontier else "")
    tds = [f'<td class="text">{html.escape(c)}</td>' for c in cells[:3]]
    if row.status == "skipped":
        tds[-1] = f'<td class="text" colspan="{width - 2}">{html.escape(cells[2])}</td>'
    tds += [f"<td>{html.escape(c)}</td>" for c in cells[3:]]
    return f'<tr class="{css}" data-cell="{html.escape(row.cell)}">{"".join(tds)}</tr>'
