"""The kernel benchmark behind `lmc bench kernels`: turbo's CUDA kernels against the GPU's own limits.

Every figure comes from one run on one device, so the ratios compare like with like:

    copy      device-to-device copy, GB/s counting read + write: the roofline of memory-bound kernels
    matmul    bf16 cuBLAS matmul of MATMUL_SIZE^3, TFLOP/s: the compute roof
    linear    each Llama-2-7B linear as turbo runs it (q/k/v and gate/up stacked) at M rows:
              torch F.linear over the dequantized weight, the W4A16 Triton kernel, torch's own
              int4 kernel (_weight_int4pack_mm); the last two with their error against the first
    paged_decode_attention   one query token per sequence over float, int8 and int4 KV blocks
    rms_norm, silu_and_mul   the fused kernels against their torch references

Bytes are what a kernel must move at least (each operand read once, the output written once);
W4 weights count as AutoAWQ stores them (4-bit codes and zeros, 16-bit scales).  Every call is
timed as turbo runs it, with the L2 cache flushed before it (a decode step reads each weight
once): calls of decode-step size (fewer than GRAPHED_BELOW_ROWS rows, and all decode attention)
inside a CUDA graph, as turbo's decode steps replay them, so the host's launch speed plays no part
(a slow host made do_bench report a 79 us o_proj GEMV that takes 8 us in a graph); prompt-sized
calls eagerly, by triton.testing.do_bench, as turbo's prompt steps run them.  The kernel
modules are imported when their rows run: a module not written yet makes its rows "missing",
a kernel that fails makes its rows "error: ...", and the other rows still run.
"""

from __future__ import annotations

import importlib
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F

from lmcompress.errors import LmcError
from lmcompress.quant.qtensor import QTensor
from lmcompress.turbo import kernels
from lmcompress.turbo.kv_cache import KVCache, KVCacheSpec

# Milliseconds per call of a no-argument function.
Timer = Callable[[Callable[[], object]], float]
# Calls with fewer rows (tokens) than this run in turbo's decode-step CUDA graphs; larger ones are prompt
# steps, run eagerly (the W4A16 linear then dequantizes and calls cuBLAS, see kernels/w4a16.py).
GRAPHED_BELOW_ROWS = 256

COPY_BYTES = 2**30
MATMUL_SIZE = 8192
RMS_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Timers:
    graphed: Timer  # decode-step calls
    eager: Timer  # prompt-step calls

    def for_rows(self, rows: int) -> Timer:
        return self.graphed if rows < GRAPHED_BELOW_ROWS else self.eager


@dataclass(frozen=True)
class LinearShape:
    name: str
    out_features: int  # N
    in_features: int  # K


# Llama-2-7B's linears as the turbo decoder runs them: one qkv_proj and one gate_up_proj GEMM.
LLAMA2_7B_LINEARS = (
    LinearShape("qkv_proj", 3 * 4096, 4096),
    LinearShape("o_proj", 4096, 4096),
    LinearShape("gate_up_proj", 2 * 11008, 4096),
    LinearShape("down_proj", 4096, 11008),
)


@dataclass(frozen=True)
class KernelBenchConfig:
    """What to time; the defaults are Llama-2-7B's shapes (32 heads of 128, no GQA, blocks of 64)."""

    dtype: torch.dtype = torch.bfloat16  # activations, dense weights, W4 scales, float KV
    linears: tuple[LinearShape, ...] = LLAMA2_7B_LINEARS
    rows: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096)  # M of every linear
    group_size: int = 128
    # (batch, context tokens per sequence) of the decode attention cases
    attention_cases: tuple[tuple[int, int], ...] = ((1, 512), (1, 4096), (1, 32768), (16, 512), (16, 4096),
                                                    (64, 512), (64, 4096))
    kv_dtypes: tuple[str, ...] = ("auto", "int8", "int4")  # auto = dtype; int8/int4 with per-token scales
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    block_size: int = 64
    hidden_size: int = 4096
    intermediate_size: int = 11008
    fused_tokens: tuple[int, ...] = (1, 64, 4096)
    matmul_size: int = MATMUL_SIZE
    copy_bytes: int = COPY_BYTES
    seed: int = 0

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def kv_dtype_name(self, name: str) -> str:
        return self.dtype_name if name == "auto" else name

    def to_dict(self) -> dict:
        return {**asdict(self), "dtype": self.dtype_name}


# --- what a kernel must move and compute -----------------------------------------------------------


def linear_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


def dense_weight_bytes(n: int, k: int, itemsize: int) -> int:
    return n * k * itemsize


def w4_weight_bytes(n: int, k: int, group_size: int, scale_itemsize: int) -> int:
    """An AutoAWQ-style 4-bit weight [n, k]: half a byte per code, per group a 16-bit scale and a 4-bit zero."""
    groups = n * (k // group_size)
    return n * k // 2 + groups * scale_itemsize + groups // 2


def linear_bytes(m: int, n: int, k: int, weight_bytes: int, itemsize: int) -> int:
    """Weight read once, activations x [m, k] read, output [m, n] written."""
    return weight_bytes + (m * k + m * n) * itemsize


def decode_attention_bytes(seq_lens: Sequence[int], num_heads: int, num_kv_heads: int, head_dim: int,
                           kv_bytes_per_head_token: int, itemsize: int) -> int:
    """K and V of every context token (codes plus any per-token scales), queries read, outputs written."""
    kv = 2 * sum(seq_lens) * num_kv_heads * kv_bytes_per_head_token
    return kv + 2 * len(seq_lens) * num_heads * head_dim * itemsize


def decode_attention_flops(seq_lens: Sequence[int], num_heads: int, head_dim: int) -> int:
    """q.k and p.v: two multiply-adds per context token, head and channel."""
    return 4 * sum(seq_lens) * num_heads * head_dim


def rms_norm_bytes(tokens: int, hidden: int, itemsize: int) -> int:
    """With a residual: x and residual read, the normed output and the new residual written, the weight read."""
    return (4 * tokens * hidden + hidden) * itemsize


def silu_and_mul_bytes(tokens: int, intermediate: int, itemsize: int) -> int:
    """gate_up [T, 2I] read, [T, I] written."""
    return 3 * tokens * intermediate * itemsize


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensors an object holds as attributes (e.g. a PackedW4 in its kernel layout)."""
    return sum(value.nbytes for value in vars(obj).values() if isinstance(value, torch.Tensor))


# --- measurements ----------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One kernel at one case.  status: ok, missing (its module is not importable) or error: ..."""

    kernel: str  # linear, paged_decode_attention, rms_norm, silu_and_mul
    impl: str  # torch, w4a16, int4pack, triton, reference, or the KV dtype for attention
    case: dict[str, int | str]
    bytes: int
    flops: int
    baseline: str | None = None  # impl of the same kernel and case this one is compared with
    status: str = "ok"
    time_us: float | None = None
    rel_err: float | None = None  # max |out - reference| / max |reference|

    @property
    def gbps(self) -> float | None:
        return None if self.time_us is None else self.bytes / self.time_us / 1e3

    @property
    def tflops(self) -> float | None:
        return None if self.time_us is None or not self.flops else self.flops / self.time_us / 1e6


def failure_status(exc: BaseException) -> str:
    """'missing' when the kernel's module (or a name in it) cannot be imported, else 'error: ...'."""
    if isinstance(exc, ImportError):
        return "missing"
    message = str(exc).strip().splitlines()
    return f"error: {type(exc).__name__}: {message[0][:160] if message else ''}".rstrip(": ")


def load_kernel(module: str, name: str) -> Callable:
    """lmcompress.turbo.kernels.<module>.<name>; ImportError when either is not there (yet)."""
    found = importlib.import_module(f"lmcompress.turbo.kernels.{module}")
    if not hasattr(found, name):
        raise ImportError(f"lmcompress.turbo.kernels.{module} has no {name}")
    return getattr(found, name)


def measure(row: Measurement, timer: Timer, prepare: Callable[[], Callable[[], object]],
            check: Callable[[Callable[[], object]], float] | None = None) -> Measurement:
    """Time the call that `prepare` builds, right away (so it may close over loop variables); the setup
    in `prepare` and the optional error `check` stay outside the timing.  Failures set row.status."""
    try:
        run = prepare()
        if check is not None:
            row.rel_err = check(run)
        row.time_us = timer(run) * 1e3
    except Exception as exc:  # one broken kernel must not cost the rest of a GPU run
        row.status, row.time_us = failure_status(exc), None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return row


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return ((out.float() - reference).abs().max() / reference.abs().max().clamp(min=1e-30)).item()


# --- the roofs ------------------------------------------------------------------------------------


def measure_copy_gbps(device: torch.device, timer: Timer, nbytes: int = COPY_BYTES) -> float:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and the bytes written."""
    source = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    target = torch.empty_like(source)
    milliseconds = timer(lambda: target.copy_(source))
    return 2 * source.nbytes / milliseconds / 1e6


def measure_matmul_tflops(device: torch.device, timer: Timer, size: int = MATMUL_SIZE,
                          dtype: torch.dtype = torch.bfloat16) -> float:
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    milliseconds = timer(lambda: torch.mm(a, b))
    return linear_flops(size, size, size) / milliseconds / 1e9


# --- linear ---------------------------------------------------------------------------------------


def random_qtensor(out_features: int, in_features: int, group_size: int, dtype: torch.dtype,
                   device: torch.device, generator: torch.Generator) -> QTensor:
    """Random 4-bit codes and zeros with scales that keep dequantized weights around N(0, 0.02)-sized."""
    groups = in_features // group_size
    return QTensor(
        q=torch.randint(0, 16, (out_features, in_features), generator=generator, device=device, dtype=torch.uint8),
        scales=(torch.rand(out_features, groups, generator=generator, device=device) * 0.004 + 0.002).to(dtype),
        zeros=torch.randint(0, 16, (out_features, groups), generator=generator, device=device, dtype=torch.uint8),
        bits=4,
        group_size=group_size,
    )


def int4pack_scales_and_zeros(qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
    """[K/g, N, 2] (scale, offset) for torch's int4 kernel, which dequantizes (q - 8) * scale + offset:
    offset = (8 - zero) * scale makes that AWQ's (q - zero) * scale."""
    scales = qt.scales.float()
    offsets = (8 - qt.zeros.float()) * scales
    return torch.stack([scales, offsets], dim=-1).transpose(0, 1).contiguous().to(dtype)


def int4pack_operands(qt: QTensor, dtype: torch.dtype, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 layout of qt (CUDA): packed codes and scales_and_zeros."""
    codes = qt.q.to(torch.int32)
    packed = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)  # [N, K/2], even column in the high nibble
    return torch._convert_weight_to_int4pack(packed, inner_k_tiles), int4pack_scales_and_zeros(qt, dtype)


def _linear_rows(config: KernelBenchConfig, device: torch.device, timers: Timers,
                 generator: torch.Generator) -> list[Measurement]:
    rows = []
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    for shape in config.linears:
        n, k = shape.out_features, shape.in_features
        qt = random_qtensor(n, k, config.group_size, config.dtype, device, generator)
        dense = qt.dequantize(config.dtype)  # [N, K]: the bf16 path and the reference compute the same product
        packed: dict[str, object] = {}
        for m in config.rows:
            x = torch.randn(m, k, generator=generator, device=device, dtype=config.dtype)
            reference = F.linear(x, dense)
            case = {"shape": shape.name, "m": m, "n": n, "k": k}
            flops = linear_flops(m, n, k)
            timer = timers.for_rows(m)
            w4_bytes = linear_bytes(m, n, k, w4_weight_bytes(n, k, config.group_size, itemsize), itemsize)

            def check(run: Callable[[], torch.Tensor]) -> float:
                return relative_error(run(), reference)

            rows.append(measure(
                Measurement("linear", "torch", case, linear_bytes(m, n, k, dense.nbytes, itemsize), flops),
                timer, lambda: lambda: F.linear(x, dense)))
            rows.append(measure(Measurement("linear", "w4a16", case, w4_bytes, flops, baseline="torch"),
                                timer, lambda: _w4a16_call(x, qt, config.dtype, packed), check))
            rows.append(measure(Measurement("linear", "int4pack", case, w4_bytes, flops, baseline="torch"),
                                timer, lambda: _int4pack_call(x, qt, config, packed), check))
    return rows


def _w4a16_call(x: torch.Tensor, qt: QTensor, dtype: torch.dtype, packed: dict) -> Callable[[], torch.Tensor]:
    """The W4A16 kernel on x; the repacked weight is built once per shape and kept in `packed`."""
    matmul = load_kernel("w4a16", "w4a16_matmul")
    if "w4a16" not in packed:
        packed["w4a16"] = load_kernel("w4a16", "PackedW4").from_qtensor(qt, dtype)
    weight = packed["w4a16"]
    return lambda: matmul(x, weight)


def _int4pack_call(x: torch.Tensor, qt: QTensor, config: KernelBenchConfig,
                   packed: dict) -> Callable[[], torch.Tensor]:
    if "int4pack" not in packed:
        packed["int4pack"] = int4pack_operands(qt, config.dtype)
    weight, scales_and_zeros = packed["int4pack"]
    return lambda: torch._weight_int4pack_mm(x, weight, config.group_size, scales_and_zeros)


# --- paged decode attention -----------------------------------------------------------------------


def filled_kv_cache(spec: KVCacheSpec, seq_lens: Sequence[int], device: torch.device,
                    generator: torch.Generator, dtype: torch.dtype) -> tuple[KVCache, torch.Tensor]:
    """A one-layer pool holding random K/V (written through the pool, so quantized pools get real
    codes and scales) and block tables [B, max_blocks] int32 over shuffled blocks, as a busy pool has."""
    blocks = [math.ceil(length / spec.block_size) for length in seq_lens]
    cache = KVCache(spec, sum(blocks), device)
    num_slots = sum(blocks) * spec.block_size
    chunk = 32768  # tokens per write: bounds the random K/V held at once
    for start in range(0, num_slots, chunk):
        slots = torch.arange(start, min(start + chunk, num_slots), device=device)
        shape = (len(slots), spec.num_kv_heads, spec.head_dim)
        keys, values = (torch.randn(shape, generator=generator, device=device, dtype=dtype) for _ in range(2))
        cache.layers[0].write(slots, keys, values)
    order = torch.randperm(sum(blocks), generator=generator, device=device).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    for row, (first, count) in enumerate(zip(accumulate(blocks, initial=0), blocks)):
        tables[row, :count] = order[first:first + count]
    return cache, tables


def _attention_rows(config: KernelBenchConfig, device: torch.device, timers: Timers,
                    generator: torch.Generator) -> list[Measurement]:
    rows = []
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    for kv_name in config.kv_dtypes:
        spec = KVCacheSpec(num_layers=1, num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                           block_size=config.block_size, dtype=config.kv_dtype_name(kv_name))
        for batch, context in config.attention_cases:
            seq_lens = [context] * batch
            row = Measurement(
                "paged_decode_attention", spec.dtype, {"batch": batch, "context": context},
                decode_attention_bytes(seq_lens, config.num_heads, config.num_kv_heads, config.head_dim,
                                       spec.bytes_per_head_token(), itemsize),
                decode_attention_flops(seq_lens, config.num_heads, config.head_dim),
                baseline=config.dtype_name,
            )
            rows.append(measure(row, timers.graphed,
                                lambda: _attention_call(config, spec, seq_lens, device, generator)))
    return rows


def _attention_call(config: KernelBenchConfig, spec: KVCacheSpec, seq_lens: list[int], device: torch.device,
                    generator: torch.Generator) -> Callable[[], torch.Tensor]:
    attention = load_kernel("paged_attention", "paged_decode_attention")
    cache, tables = filled_kv_cache(spec, seq_lens, device, generator, config.dtype)
    query = torch.randn(len(seq_lens), config.num_heads, config.head_dim, generator=generator, device=device,
                        dtype=config.dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = config.head_dim**-0.5
    return lambda: attention(query, cache.layers[0], tables, lens, scale)


# --- fused small ops ------------------------------------------------------------------------------


def _fused_rows(config: KernelBenchConfig, device: torch.device, timers: Timers,
                generator: torch.Generator) -> list[Measurement]:
    rows = []
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    hidden, intermediate = config.hidden_size, config.intermediate_size
    weight = torch.rand(hidden, generator=generator, device=device).to(config.dtype) + 0.5
    for tokens in config.fused_tokens:
        x, residual = (torch.randn(tokens, hidden, generator=generator, device=device, dtype=config.dtype)
                       for _ in range(2))
        gate_up = torch.randn(tokens, 2 * intermediate, generator=generator, device=device, dtype=config.dtype)
        timer = timers.for_rows(tokens)
        for impl, suffix in (("triton", ""), ("reference", "_reference")):
            baseline = "reference" if impl == "triton" else None

            def norm() -> Callable[[], object]:
                fn = load_kernel("fused", f"rms_norm{suffix}")
                return lambda: fn(x, weight, RMS_NORM_EPS, residual)

            def swiglu() -> Callable[[], object]:
                fn = load_kernel("fused", f"silu_and_mul{suffix}")
                return lambda: fn(gate_up)

            rows.append(measure(Measurement("rms_norm", impl, {"tokens": tokens, "hidden": hidden},
                                            rms_norm_bytes(tokens, hidden, itemsize), 0, baseline), timer, norm))
            rows.append(measure(Measurement("silu_and_mul", impl, {"tokens": tokens, "intermediate": intermediate},
                                            silu_and_mul_bytes(tokens, intermediate, itemsize), 0, baseline),
                                timer, swiglu))
    return rows


# --- the run --------------------------------------------------------------------------------------


@dataclass
class KernelBenchResult:
    device: str
    dtype: str  # of the activations, dense weights and the matmul roof
    copy_gbps: float
    matmul_tflops: float
    measurements: list[Measurement] = field(default_factory=list)

    def baseline_of(self, row: Measurement) -> Measurement | None:
        if row.baseline is None:
            return None
        return next((other for other in self.measurements if other.kernel == row.kernel
                     and other.case == row.case and other.impl == row.baseline), None)

    def speedup(self, row: Measurement) -> float | None:
        """How many times faster than its baseline (baseline time / this time)."""
        base = self.baseline_of(row)
        if base is None or base.time_us is None or row.time_us is None:
            return None
        return base.time_us / row.time_us

    def copy_fraction(self, row: Measurement) -> float | None:
        return None if row.gbps is None else row.gbps / self.copy_gbps

    def layer_linear_us(self) -> list[dict]:
        """Per M and linear implementation: the time of all of one decoder layer's linears."""
        totals: dict[int, dict[str, float | None]] = {}
        for row in self.measurements:
            if row.kernel != "linear":
                continue
            by_impl = totals.setdefault(row.case["m"], {})
            earlier = by_impl.get(row.impl, 0.0)
            by_impl[row.impl] = None if earlier is None or row.time_us is None else earlier + row.time_us
        return [{"m": m, **{f"{impl}_us": us for impl, us in by_impl.items()}} for m, by_impl in totals.items()]

    def to_dict(self) -> dict:
        rows = [{**asdict(row), "gbps": row.gbps, "tflops": row.tflops, "copy_fraction": self.copy_fraction(row),
                 "speedup": self.speedup(row)} for row in self.measurements]
        return {"device": self.device, "dtype": self.dtype, "copy_gbps": self.copy_gbps,
                "matmul_tflops": self.matmul_tflops, "measurements": rows, "layer_linear_us": self.layer_linear_us()}


def run_kernel_bench(config: KernelBenchConfig, device: torch.device, timers: Timers) -> KernelBenchResult:
    """Time every kernel and case of `config` on `device` (CUDA in real runs; any device with fake timers)."""
    generator = torch.Generator(device=device).manual_seed(config.seed)
    result = KernelBenchResult(
        device=str(device),
        dtype=config.dtype_name,
        copy_gbps=measure_copy_gbps(device, timers.eager, config.copy_bytes),
        matmul_tflops=measure_matmul_tflops(device, timers.eager, config.matmul_size, config.dtype),
    )
    for rows in (_linear_rows, _attention_rows, _fused_rows):
        result.measurements += rows(config, device, timers, generator)
    return result


def require_kernel_device(device: torch.device) -> None:
    """LmcError unless turbo's Triton kernels can run on `device`."""
    if device.type != "cuda":
        raise LmcError(f"lmc bench kernels times CUDA kernels and the device is {device}; "
                       "run it on a CUDA machine (--device cuda)")
    if not kernels.available(device):
        raise LmcError("lmc bench kernels needs the triton package next to CUDA torch; pip install triton")


def cuda_timer(warmup_ms: int = 25, rep_ms: int = 100) -> Timer:
    """Median milliseconds per call by triton.testing.do_bench (L2 flushed before every call)."""
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def cuda_timers() -> Timers:
    return Timers(graphed=CudaGraphTimer(), eager=cuda_timer())


class CudaGraphTimer:
    """Median milliseconds per call of the device alone: `calls` calls captured in one CUDA graph, each after
    a read of flush_bytes (which evicts the call's operands from L2 and leaves it clean), less the same graph
    without the calls, over `trials` replays of each."""

    def __init__(self, calls: int = 50, trials: int = 5, flush_bytes: int = 2**28):
        self.calls, self.trials, self.flush_bytes = calls, trials, flush_bytes
        self._flush: torch.Tensor | None = None

    def __call__(self, fn: Callable[[], object]) -> float:
        if self._flush is None:
            self._flush = torch.ones(self.flush_bytes // 4, device="cuda")
        flush = self._flush.sum
        with_calls = capture_graph(lambda: (flush(), fn()), self.calls)
        flush_only = capture_graph(flush, self.calls)
        trials = [(replay_ms(with_calls) - replay_ms(flush_only)) / self.calls for _ in range(self.trials)]
        return statistics.median(trials)


def capture_graph(step: Callable[[], object], times: int, warmups: int = 3) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `times` calls of step, after `warmups` calls on a side stream (Triton compiles,
    allocator pools).  The kernel sweeps under tests/gpu time their launches with it too (graph_timing.py)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(times):
            step()
    return graph


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int = 1) -> float:
    """Device milliseconds of `replays` back-to-back replays of graph."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


# --- the report -----------------------------------------------------------------------------------

Table = tuple[str, list[str], list[list[str]]]  # title, column headers, rows of cells


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _timing_cells(result: KernelBenchResult, row: Measurement) -> list[str]:
    if row.status != "ok":
        return [row.status[:48], "", "", "", ""]
    return [_num(row.time_us), _num(row.gbps, 0), _num(row.tflops, 2), _num(100 * result.copy_fraction(row)),
            _num(result.speedup(row), 2)]


def tables(result: KernelBenchResult) -> list[Table]:
    """The result as printable tables: roofs, linears, attention, fused ops and per-layer linear totals."""
    timing = ["us", "GB/s", "TFLOP/s", "% copy", "speedup"]
    roofs = ("Roofs", ["figure", "value"], [["copy GB/s (read + write)", _num(result.copy_gbps, 0)],
                                            [f"{result.dtype} matmul TFLOP/s", _num(result.matmul_tflops, 1)]])
    by_kernel: dict[str, list[list[str]]] = {}
    for row in result.measurements:
        case = " ".join(f"{key}={value}" for key, value in row.case.items())
        err = "" if row.rel_err is None else f"{row.rel_err:.1e}"
        by_kernel.setdefault(row.kernel, []).append([case, row.impl, *_timing_cells(result, row), err])
    detail = [(f"{kernel} (speedup over {_baseline_name(kernel)})", ["case", "impl", *timing, "rel err"], cells)
              for kernel, cells in by_kernel.items()]
    layer = result.layer_linear_us()
    impls = sorted({key for entry in layer for key in entry if key != "m"})
    totals = ("One layer's linears (us)", ["m", *impls],
              [[str(entry["m"]), *(_num(entry.get(impl)) for impl in impls)] for entry in layer])
    return [roofs, *detail, totals]


def _baseline_name(kernel: str) -> str:
    return {"linear": "torch F.linear", "paged_decode_attention": "float KV"}.get(kernel, "the torch reference")
