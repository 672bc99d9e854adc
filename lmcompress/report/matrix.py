"""The report's cells, method x KV dtype, computed once each and resumed after an interruption.

    for each method:   a model cell   quantize SRC (or reuse it), weight bytes on disk and in memory
        for each KV:   an eval cell   KV bytes per token; perplexity and task accuracy through the cell's engine

The accuracy columns are not applicable, and not computed, when SRC holds random
weights (config.json marked by lmcompress.reference.dummy) or with --no-accuracy:
the memory and quantize-time columns are then the whole report.

Every finished cell is written atomically to OUT/cells/<key>.json together with
the fingerprint of the settings that produced it; a rerun reuses a cell whose
fingerprint matches and recomputes it otherwise, so an interrupted report
resumes where it stopped and a report with changed settings never mixes in
stale numbers.  All input is checked before the first cell is computed.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from lmcompress.errors import LmcError
from lmcompress.report import bnb, memory
from lmcompress.report.engines import kv_dtype_named, measure_perplexity, measure_task, open_engine, short_kv_name
from lmcompress.report.files import write_json_atomic
from lmcompress.report.memory import GpuBudget
from lmcompress.report.provenance import checkpoint_identity, command, environment, fingerprint, text_sha256
from lmcompress.report.tasks import Task, load_task

FLOAT_METHOD = "fp16"  # the source checkpoint as it is
# Why a report's accuracy columns are not applicable (shown as "n/a (<why>)").
RANDOM_WEIGHTS = "random weights"
NO_ACCURACY = "--no-accuracy"
LMC_METHODS = ("rtn", "awq", "gptq")
METHODS = (FLOAT_METHOD, *LMC_METHODS, *bnb.BNB_METHODS)


def parse_methods(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise LmcError(f"unknown method {', '.join(unknown) or '(none)'} in --methods; use a comma list of "
                       f"{', '.join(METHODS)}")
    return names


def parse_kv_dtypes(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(kv_dtype_named(name.strip()) for name in text.split(",") if name.strip()))
    if not names:
        raise LmcError("--kv names no KV cache dtype; pass a comma list such as fp16,int8,int4")
    return names


# Where a benchmark's result file keeps its output tokens/s: `lmc bench serve --result-file`,
# then `lmc bench throughput --json`.
THROUGHPUT_KEYS = (("output_throughput",), ("throughput", "output_tok_s"))


def load_bench_results(path: str | Path) -> dict[str, float]:
    """Decode tokens/s per cell from a JSON object keyed METHOD/KV.

    Each value is a number, or the path (relative to this file) of a benchmark result
    whose output token throughput is taken (a THROUGHPUT_KEYS entry), e.g.
    {"fp16/fp16": 301.0, "awq/int8": "bench-awq-int8.json"}.
    """
    results = _read_json(Path(path), 'a JSON object of METHOD/KV: tokens/s, e.g. {"awq/int8": 812.5}')
    if not isinstance(results, dict):
        raise LmcError(f'bench results {path} must be a JSON object of METHOD/KV: tokens/s, e.g. {{"awq/int8": 812.5}}')
    return {str(cell): _tokens_per_s(Path(path), cell, value) for cell, value in results.items()}


def _tokens_per_s(path: Path, cell: str, value: object) -> float:
    if isinstance(value, str):
        value = _output_throughput(_read_json(path.parent / value, "an lmc bench serve or throughput result file"))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise LmcError(f"bench results {path}: {cell} must be positive tokens/s or the path of an lmc bench "
                       f"serve --result-file or lmc bench throughput --json file, got {value!r}")
    return float(value)


def _output_throughput(record: object) -> object:
    for keys in THROUGHPUT_KEYS:
        value = record
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LmcError(f"cannot read {path} ({exc}); pass {what}") from None


@dataclass(frozen=True)
class ReportConfig:
    src: Path
    out: Path
    methods: tuple[str, ...]
    kv_dtypes: tuple[str, ...]  # the runtime's names: float16, int8, ...
    eval_data: str | None  # needed unless accuracy is not applicable
    eval_tokens: int | None = None
    max_length: int | None = None
    stride: int | None = None
    tasks: tuple[str, ...] = ("builtin",)
    task_limit: int | None = None
    calib_data: str = "pileval"
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 42
    group_size: int = 128
    device: str = "auto"
    budget: GpuBudget = field(default_factory=GpuBudget)
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)  # "method/kv" -> measured by lmc bench
    accuracy: bool = True  # False: --no-accuracy, memory and quantize-time columns only

    @property
    def models_dir(self) -> Path:
        return self.out / "models"

    def command(self) -> str:
        """The `lmc report` command line that reproduces this report, every setting explicit."""
        budget = self.budget
        return command(
            "lmc", "report", self.src, "--methods", ",".join(self.methods),
            "--kv", ",".join(short_kv_name(kv) for kv in self.kv_dtypes), "--eval-data", self.eval_data,
            "--out", self.out, "--eval-tokens", self.eval_tokens, "--max-length", self.max_length,
            "--stride", self.stride, *[word for task in self.tasks for word in ("--task", task)],
            "--task-limit", self.task_limit, "--context", budget.context, "--gpu-mem", _size_arg(budget.gpu_bytes),
            "--activation-reserve", _size_arg(budget.activation_reserve_bytes), "--calib-data", self.calib_data,
            "--calib-samples", self.calib_samples, "--calib-seqlen", self.calib_seqlen, "--seed", self.seed,
            "--group-size", self.group_size, "--device", self.device, *(() if self.accuracy else (NO_ACCURACY,)),
        )


def _size_arg(n: int) -> str:
    """Bytes as the shortest exact --gpu-mem style size: 24GiB, 512MiB or a plain count."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


@dataclass
class ModelCell:
    method: str
    model_dir: str
    engine: str  # "turbo" or "transformers"
    weight_bytes_disk: int
    weight_bytes_memory: int
    memory_basis: str  # how weight_bytes_memory was measured
    quantize_seconds: float | None  # None for the float source
    quantize_peak_gpu_bytes: int | None  # torch's peak allocated GPU memory while quantizing; None off CUDA
    quantize_command: str | None
    seeds: dict
    environment: dict


@dataclass
class EvalCell:
    method: str
    kv_cache_dtype: str
    engine: str
    kv_bytes_per_token: int
    perplexity: dict | None  # PerplexityResult fields; None where accuracy is not applicable
    tasks: list[dict]  # TaskResult fields + the task file's sha256; empty where accuracy is not applicable
    seconds: float
    commands: list[str]
    environment: dict


CellT = TypeVar("CellT", ModelCell, EvalCell)


@dataclass(frozen=True)
class Skipped:
    method: str
    kv_cache_dtype: str | None  # None: every KV dtype of the method
    reason: str


@dataclass
class MatrixResult:
    models: dict[str, ModelCell]
    evals: dict[tuple[str, str], EvalCell]
    skipped: list[Skipped]
    environment: dict
    accuracy_na: str | None = None  # why perplexity and tasks were not computed (RANDOM_WEIGHTS, NO_ACCURACY)


class CellStore:
    """OUT/cells/<key>.json files, each written atomically with its settings' fingerprint."""

    def __init__(self, directory: Path):
        self.directory = directory

    def load(self, key: str, expected_fingerprint: str, cell_type: type[CellT]) -> CellT | None:
        """The saved `key` cell if it was made under `expected_fingerprint` with cell_type's fields, else None."""
        path = self.directory / f"{key}.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        cell = saved.get("cell") if isinstance(saved, dict) else None
        if saved.get("fingerprint") != expected_fingerprint or not isinstance(cell, dict):
            return None
        if set(cell) != {f.name for f in fields(cell_type)}:  # written by another version of lmc report
            return None
        return cell_type(**cell)

    def save(self, key: str, cell_fingerprint: str, cell: ModelCell | EvalCell) -> None:
        write_json_atomic(self.directory / f"{key}.json", {"fingerprint": cell_fingerprint, "cell": asdict(cell)})


@dataclass(frozen=True)
class _Inputs:
    """Everything read and checked before the first cell runs."""

    device: torch.device
    accuracy_na: str | None  # RANDOM_WEIGHTS or NO_ACCURACY: no evaluation text, no tasks, nothing scored
    eval_text: str | None
    tasks: tuple[Task, ...]
    source_identity: dict
    bnb_unavailable: str | None


def run_matrix(config: ReportConfig, progress: bool = True) -> MatrixResult:
    """Compute (or reuse) every cell of the report."""
    inputs = _check_inputs(config)
    store = CellStore(config.out / "cells")
    result = MatrixResult(models={}, evals={}, skipped=[], environment=environment(inputs.device),
                          accuracy_na=inputs.accuracy_na)
    steps = len(config.methods) * (1 + len(config.kv_dtypes))
    with _one_progress_bar(), tqdm(total=steps, desc="lmc report", unit="cell", disable=not progress) as bar:
        for method in config.methods:
            bar.set_postfix_str(f"{method} weights")
            reason = _method_unavailable(method, inputs)
            if reason is not None:
                result.skipped.append(Skipped(method, None, reason))
                bar.update(1 + len(config.kv_dtypes))
                continue
            model_fp, model = _model_cell(config, inputs, store, method)
            result.models[method] = model
            bar.update()
            for kv in config.kv_dtypes:
                bar.set_postfix_str(f"{method} / KV {short_kv_name(kv)}")
                reason = _cell_unavailable(model, kv)
                if reason is not None:
                    result.skipped.append(Skipped(method, kv, reason))
                else:
                    result.evals[(method, kv)] = _eval_cell(config, inputs, store, model, model_fp, kv)
                bar.update()
    return result


@contextmanager
def _one_progress_bar() -> Iterator[None]:
    """Silence transformers' per-load progress bars so the matrix's bar is the only one."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def _check_inputs(config: ReportConfig) -> _Inputs:
    from lmcompress.calib.data import load_eval_text
    from lmcompress.checkpoint import Checkpoint
    from lmcompress.resources import resolve_device

    _check_counts(config)
    source = Checkpoint(config.src)
    if (source.config.get("quantization_config") or {}).get("quant_method"):
        raise LmcError(f"{config.src} is already quantized; pass the original float checkpoint as SRC")
    positions = source.config.get("max_position_embeddings")
    if config.max_length is not None and positions and config.max_length > positions:
        raise LmcError(f"--max-length {config.max_length} exceeds the model's {positions} positions; "
                       f"pass --max-length {positions} or less")
    accuracy_na = _accuracy_not_applicable(config)
    if accuracy_na is None:
        _check_eval_data(config.eval_data)
    unknown = sorted(set(config.decode_tokens_per_s) - {f"{m}/{short_kv_name(k)}" for m in METHODS
                                                          for k in config.kv_dtypes})
    if unknown:
        raise LmcError(f"bench results name unknown cells {', '.join(unknown)}; key them as METHOD/KV, e.g. awq/int8")
    device = resolve_device(config.device)
    needs_bnb = any(method in bnb.BNB_METHODS for method in config.methods)
    scored = accuracy_na is None
    return _Inputs(
        device=device,
        accuracy_na=accuracy_na,
        eval_text=load_eval_text(config.eval_data) if scored else None,
        tasks=tuple(load_task(spec) for spec in config.tasks) if scored else (),
        source_identity=checkpoint_identity(config.src),
        bnb_unavailable=bnb.unavailable_reason(device) if needs_bnb else None,
    )


def _accuracy_not_applicable(config: ReportConfig) -> str | None:
    """Why perplexity and task accuracy are not computed, or None when they are."""
    from lmcompress.reference.dummy import has_dummy_weights

    if has_dummy_weights(config.src):
        return RANDOM_WEIGHTS  # measuring noise would only mislead
    return None if config.accuracy else NO_ACCURACY


def _check_eval_data(eval_data: str | None) -> None:
    from lmcompress.calib.data import EVAL_SETS

    if eval_data is None:
        raise LmcError(f"no evaluation data for the accuracy columns; pass --eval-data PATH to a text file "
                       f"(or {', '.join(EVAL_SETS)} when cached), or {NO_ACCURACY} for the memory columns alone")
    if not Path(eval_data).exists() and eval_data not in EVAL_SETS:
        raise LmcError(f"evaluation data {eval_data} not found; pass --eval-data PATH to an existing "
                       f"text file (or {', '.join(EVAL_SETS)} when cached)")


def _check_counts(config: ReportConfig) -> None:
    """Numeric options that would fail only later, mid-matrix, checked before anything runs."""
    minimums = {"--eval-tokens": (config.eval_tokens, 2), "--max-length": (config.max_length, 2),
                "--stride": (config.stride, 1), "--task-limit": (config.task_limit, 1),
                "--calib-samples": (config.calib_samples, 1), "--calib-seqlen": (config.calib_seqlen, 2)}
    for option, (value, minimum) in minimums.items():
        if value is not None and value < minimum:
            raise LmcError(f"{option} {value} is too small; pass {minimum} or more (or leave it out for the default)")


def _method_unavailable(method: str, inputs: _Inputs) -> str | None:
    return inputs.bnb_unavailable if method in bnb.BNB_METHODS else None


def _cell_unavailable(model: ModelCell, kv: str) -> str | None:
    if model.engine == "transformers" and kv != bnb.COMPUTE_DTYPE_NAME:
        return (f"turbo does not run bitsandbytes weights and transformers keeps their KV cache in "
                f"{short_kv_name(bnb.COMPUTE_DTYPE_NAME)}, so there is no {short_kv_name(kv)} KV cache to measure")
    return None


def _model_settings(config: ReportConfig, inputs: _Inputs, method: str) -> dict:
    settings = {"src": str(config.src.resolve()), "source": inputs.source_identity, "method": method,
                "device": str(inputs.device)}
    if method in LMC_METHODS:
        settings |= {"calib_data": config.calib_data, "calib_samples": config.calib_samples,
                     "calib_seqlen": config.calib_seqlen, "seed": config.seed, "group_size": config.group_size}
    if method in bnb.BNB_METHODS:
        settings |= {"bitsandbytes": bnb.bnb_version()}
    return settings


def _model_cell(config: ReportConfig, inputs: _Inputs, store: CellStore, method: str) -> tuple[str, ModelCell]:
    key, cell_fp = f"model-{method}", fingerprint(_model_settings(config, inputs, method))
    saved = store.load(key, cell_fp, ModelCell)
    if saved is not None and (Path(saved.model_dir) / "config.json").is_file():
        return cell_fp, saved
    if method == FLOAT_METHOD:
        cell = _float_model_cell(config, inputs)
    elif method in LMC_METHODS:
        cell = _lmc_model_cell(config, inputs, method)
    else:
        cell = _bnb_model_cell(config, inputs, method)
    store.save(key, cell_fp, cell)
    _release_memory(inputs.device)
    return cell_fp, cell


def _release_memory(device: torch.device) -> None:
    """Free what a finished cell left behind, so the next cell's peak GPU memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _float_model_cell(config: ReportConfig, inputs: _Inputs) -> ModelCell:
    return ModelCell(
        method=FLOAT_METHOD, model_dir=str(config.src), engine="turbo",
        weight_bytes_disk=memory.disk_bytes(config.src),
        weight_bytes_memory=memory.turbo_weight_bytes(config.src, inputs.device),
        memory_basis="turbo, float16 weights", quantize_seconds=None, quantize_peak_gpu_bytes=None,
        quantize_command=None, seeds={},
        environment=environment(inputs.device),
    )


def _lmc_model_cell(config: ReportConfig, inputs: _Inputs, method: str) -> ModelCell:
    from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
    from lmcompress.quant.qtensor import QuantConfig

    out = config.models_dir / method
    fmt = "gptq" if method == "gptq" else "awq"
    options = QuantizeOptions(
        method=method, quant=QuantConfig(group_size=config.group_size), fmt=fmt, calib_data=config.calib_data,
        calib_samples=config.calib_samples, calib_seqlen=config.calib_seqlen, seed=config.seed,
        device=str(inputs.device),
    )
    summary = quantize_checkpoint(config.src, out, options, overwrite=True, progress=False)
    return ModelCell(
        method=method, model_dir=str(out), engine="turbo",
        weight_bytes_disk=memory.disk_bytes(out), weight_bytes_memory=memory.turbo_weight_bytes(out, inputs.device),
        memory_basis="turbo, packed 4-bit linears + float16 rest", quantize_seconds=summary.seconds,
        quantize_peak_gpu_bytes=summary.peak_memory_bytes if summary.peak_memory_kind == "gpu_allocated" else None,
        quantize_command=command(
            "lmc", "quantize", config.src, out, "--method", method, "--format", fmt,
            "--group-size", config.group_size, "--calib-data", config.calib_data,
            "--calib-samples", config.calib_samples, "--calib-seqlen", config.calib_seqlen,
            "--seed", config.seed, "--device", inputs.device, "--overwrite",
        ),
        seeds={"calibration": config.seed}, environment=environment(inputs.device),
    )


def _bnb_model_cell(config: ReportConfig, inputs: _Inputs, method: str) -> ModelCell:
    out = config.models_dir / method
    summary = bnb.quantize_bnb(config.src, out, method, inputs.device)
    return ModelCell(
        method=method, model_dir=str(out), engine="transformers",
        weight_bytes_disk=memory.disk_bytes(out), weight_bytes_memory=summary.memory_bytes,
        memory_basis="transformers, parameters + buffers + bitsandbytes quantization state, float16 compute",
        quantize_seconds=summary.seconds, quantize_peak_gpu_bytes=summary.peak_gpu_bytes,
        quantize_command=command(
            "lmc", "report", config.src, "--methods", method, "--kv", "fp16", NO_ACCURACY,
            "--device", inputs.device, "--out", config.out,
        ),
        seeds={}, environment=environment(inputs.device) | {"bnb_config": summary.config},
    )


def _eval_settings(config: ReportConfig, inputs: _Inputs, model_fp: str, kv: str) -> dict:
    if inputs.accuracy_na is not None:
        return {"model": model_fp, "kv_cache_dtype": kv, "accuracy_na": inputs.accuracy_na}
    return {
        "model": model_fp, "kv_cache_dtype": kv, "eval_data": config.eval_data,
        "eval_text_sha256": text_sha256(inputs.eval_text), "eval_tokens": config.eval_tokens,
        "max_length": config.max_length, "stride": config.stride, "task_limit": config.task_limit,
        "tasks": [task.sha256 for task in inputs.tasks], "device": str(inputs.device),
    }


def _eval_cell(config: ReportConfig, inputs: _Inputs, store: CellStore, model: ModelCell, model_fp: str,
               kv: str) -> EvalCell:
    key = f"eval-{model.method}-{short_kv_name(kv)}"
    cell_fp = fingerprint(_eval_settings(config, inputs, model_fp, kv))
    saved = store.load(key, cell_fp, EvalCell)
    if saved is not None:
        return saved
    if inputs.accuracy_na is not None:
        cell = _memory_eval_cell(model, kv, inputs)
    else:
        cell = _scored_eval_cell(config, inputs, model, kv)
    store.save(key, cell_fp, cell)
    _release_memory(inputs.device)
    return cell


def _memory_eval_cell(model: ModelCell, kv: str, inputs: _Inputs) -> EvalCell:
    """A cell whose accuracy is not applicable: its KV bytes per token alone, no engine opened."""
    return EvalCell(
        method=model.method, kv_cache_dtype=kv, engine=model.engine,
        kv_bytes_per_token=memory.kv_bytes_per_token(model.model_dir, kv), perplexity=None, tasks=[], seconds=0.0,
        commands=[], environment=environment(inputs.device),
    )


def _scored_eval_cell(config: ReportConfig, inputs: _Inputs, model: ModelCell, kv: str) -> EvalCell:
    start = time.perf_counter()
    engine = open_engine(model.model_dir, kv, inputs.device, config.max_length)
    ppl = measure_perplexity(engine, model.model_dir, inputs.eval_text, config.eval_tokens, config.max_length,
                             config.stride)
    tasks = [asdict(measure_task(engine, model.model_dir, task, config.task_limit)) | {"sha256": task.sha256}
             for task in inputs.tasks]
    return EvalCell(
        method=model.method, kv_cache_dtype=kv, engine=engine.name,
        kv_bytes_per_token=memory.kv_bytes_per_token(model.model_dir, kv),
        perplexity=asdict(ppl), tasks=tasks, seconds=time.perf_counter() - start,
        commands=_eval_commands(config, inputs, model, kv), environment=environment(inputs.device),
    )


def _eval_commands(config: ReportConfig, inputs: _Inputs, model: ModelCell, kv: str) -> list[str]:
    """The `lmc eval` commands that recompute this cell's numbers alone."""
    common = ("--kv-cache-dtype", short_kv_name(kv), "--device", inputs.device)
    ppl = command("lmc", "eval", "ppl", model.model_dir, "--data", config.eval_data,
                  "--max-tokens", config.eval_tokens, "--max-length", config.max_length, "--stride", config.stride,
                  *common)
    tasks = [command("lmc", "eval", "task", model.model_dir, "--task", task, "--limit", config.task_limit, *common)
             for task in config.tasks]
    return [ppl, *tasks]
