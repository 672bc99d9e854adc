"""W4A16 linear: y = x @ dequant(W).T + b with 4-bit group-quantized W dequantized in registers.

PackedW4 is W repacked once at load from lmc's QTensor into the layout the kernel reads.  Input channels
come in blocks of 128; block b is 16 int32 rows of qweight, and byte i of row 16b + r holds channels
128b + 32i + 2r (nibble 2i, bits 8i..8i+3) and 128b + 32i + 2r + 1 (nibble 2i + 1).  "Code plane" j of a
block is nibble j of its 16 rows; planes 2i and 2i + 1 together are the 32 consecutive channels
128b + 32i.., which meet a contiguous 32-column slice of x (one K = 32 step of tl.dot with the two planes
interleaved; the GEMV reads a plane's 16 channels, every other one of them) and lie in one quantization
group for group sizes 32, 64 and 128.

    qweight [K'/8, N] int32   K' = K rounded up to 128; threads read consecutive output columns, so
                              every load is coalesced along N whatever M is
    scales  [K'/g, N]         the QTensor's scales, dtype unchanged (fp16 from checkpoints, fp32 from lmc's
                              quantizers); the kernels compute in float32
    zeros   [K'/g, N] uint8   zero-point codes
    perm    [K] long | None   act-order (GPTQ g_idx not sorted): packed channel p is channel perm[p] of x.
                              Packing sorts the channels by group, so the kernel only sees contiguous
                              groups; w4a16_matmul gathers x's columns to match (one extra small kernel).
Channels K..K'-1 (only when 128 does not divide K) have scale 0, and x is zero-padded to K'.

One kernel, two inner loops, picked per M bucket (M_BUCKETS):
  * GEMV (block_m == 1, used for M == 1), CUDA cores.  A nibble masked where it sits, read as a float32, is the
    denormal q * 2**(4p - 149) (p = its nibble position, 0..5 below the exponent; codes 6 and 7 come
    from packed >> 16), so one LOP and one FMA with x * 2**(75 - 4p) add x * q * 2**-74 per weight: no
    shifts, no int-to-float conversions (quarter-rate or slower on sm_90).  A plane's zero and scale
    apply once to its sum: s * (sum x q - z * sum x).
  * Tiles (block_m >= 16), tensor cores, computing out^T = W^T x^T so the dequantized weight is wgmma's
    register operand.  A block's 16 packed rows are loaded once; each byte (two code planes, 32
    consecutive channels) is one dot step of K = 32 against 32 contiguous columns of x, so nothing is
    gathered.  The weight is the exact integer q - z in x's dtype, the two K-neighbours of each row in one
    register: on CUDA three PTX instructions per two weights (_PAIR_ASM_*), in the interpreter float32
    arithmetic (_plane_weight).  It is scaled before the dot or after the group's float32 sum
    (TileConfig.scale_in_weight).  SASS loop counts (tests/gpu/sass_stats.py): at block_m 16, 13.6
    instructions a weight gathering [64, BN] tiles (before run L), 5.4 with float32 dequantization per plane
    (runs L-N), 3.1 with PTX pairing two rows' planes (run O, K = 16 a dot); K = 32 a dot (run U) takes
    3.5 there but 5.0 against 6.1 at block_m 32-64 with 8 warps, with half the x loads and wgmma waits.
Both split K over programs when the output tiles alone would leave SMs idle: each split stores its float32
partial tile to a per-device workspace [splits, M, N], and the splits are summed in a fixed order (then the
bias added and the cast done) in one of two ways, both deterministic and CUDA-graph safe:
  * GEMV: the split arriving last at the tile's counter sums them and resets the counter (CUTLASS's semaphore:
    a CTA barrier, then one release atomic, so every thread's partial is visible before the count; the last
    split reads the partials past L1).  One launch: a second one cost about 4 us per linear (run H).
  * Tiles: a second small kernel.  A [BM, BN] float32 partial per split is too much for one program to sum
    at the end (single-pass made M = 64 about 1.3x slower, run I).
From DEQUANT_GEMM_MIN_M rows on (outside graph capture, without an explicit config) a memory-bound kernel
dequantizes W into a reused per-device scratch buffer and cuBLAS does the GEMM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from lmcompress.errors import LmcError
from lmcompress.formats.packing import CODES_PER_INT32, is_identity_groups, pack_nibbles, unpack_nibbles
from lmcompress.quant.qtensor import SUPPORTED_GROUP_SIZES, QTensor
from lmcompress.turbo.kernels import MAGIC_BITS, sm_count
from lmcompress.turbo.kernels.pdl import allow_dependents, pdl_launch, wait_for_producers

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PLANE_CHANNELS = 16  # input channels of one code plane
BLOCK_CHANNELS = 8 * PLANE_CHANNELS  # input channels of one packed block (16 int32 rows)


@dataclass
class PackedW4:
    """A 4-bit group-quantized [N, K] weight in the W4A16 kernel's layout (see the module docstring)."""

    qweight: torch.Tensor  # [K'/8, N] int32, K' = K rounded up to 128
    scales: torch.Tensor  # [K'/g, N] float
    zeros: torch.Tensor  # [K'/g, N] uint8
    perm: torch.Tensor | None  # [K] long: packed channel p is input channel perm[p]; None: identity
    in_features: int
    group_size: int
    dtype: torch.dtype  # compute dtype: what dequantize() returns by default

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def padded_in_features(self) -> int:
        return self.qweight.shape[0] * CODES_PER_INT32

    @classmethod
    def from_qtensor(cls, qt: QTensor, dtype: torch.dtype) -> PackedW4:
        out_features, in_features = qt.shape
        if qt.bits != 4 or qt.group_size not in SUPPORTED_GROUP_SIZES or in_features % qt.group_size:
            raise LmcError(
                f"the W4A16 kernel takes 4-bit weights with group size 32, 64 or 128 dividing in_features, got "
                f"{qt.bits} bits, group size {qt.group_size} and [{out_features}, {in_features}]; "
                "quantize with --bits 4 and one of those group sizes"
            )
        codes, perm = qt.q, None
        if qt.g_idx is not None and not is_identity_groups(qt.g_idx, qt.group_size):
            perm = torch.argsort(qt.g_idx.long(), stable=True)
            if not is_identity_groups(qt.g_idx[perm], qt.group_size):
                raise LmcError(
                    f"act-order weight [{out_features}, {in_features}] has groups that are not {qt.group_size} "
                    "channels each; the W4A16 kernel needs equal groups: re-quantize it, or load the model "
                    "with dequantized weights (dequantize_weights=True)"
                )
            codes = codes[:, perm]
        pad = -in_features % BLOCK_CHANNELS
        group_pad = pad // qt.group_size
        codes = F.pad(codes, (0, pad))
        blocks = codes.reshape(out_features, -1, 4, PLANE_CHANNELS, 2)  # [N, K'/128, byte i, row r, nibble parity]
        packed = cls(
            qweight=pack_nibbles(blocks.transpose(2, 3).reshape(out_features, -1)).t().contiguous(),
            scales=F.pad(qt.scales, (0, group_pad)).t().contiguous(),  # padded channels: scale 0
            zeros=F.pad(qt.zeros, (0, group_pad)).t().contiguous(),
            perm=perm,
            in_features=in_features,
            group_size=qt.group_size,
            dtype=dtype,
        )
        if packed.qweight.is_cuda:
            # Under PDL the GEMV reads its weights before waiting for the kernels before it (pdl.py), so the
            # packing kernels must be done before any launch that may use them: once per linear, at load.
            torch.cuda.current_stream(packed.qweight.device).synchronize()
        return packed

    def codes(self) -> torch.Tensor:
        """[N, K'] uint8 codes in packed channel order (perm applied, padding included)."""
        blocks = unpack_nibbles(self.qweight.t()).reshape(self.out_features, -1, PLANE_CHANNELS, 4, 2)
        return blocks.transpose(2, 3).reshape(self.out_features, -1)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[N, K] weight in dtype (default self.dtype), equal to QTensor.dequantize(dtype) bit for bit."""
        scales = self.scales.t().float().repeat_interleave(self.group_size, dim=1)
        zeros = self.zeros.t().float().repeat_interleave(self.group_size, dim=1)
        weight = ((self.codes().float() - zeros) * scales)[:, : self.in_features].to(dtype or self.dtype)
        return weight if self.perm is None else weight[:, torch.argsort(self.perm)]

    def to_qtensor(self) -> QTensor:
        """The QTensor this was packed from (act-order comes back as codes in input order plus g_idx)."""
        groups = self.in_features // self.group_size
        codes = self.codes()[:, : self.in_features]
        scales, zeros = self.scales[:groups].t().contiguous(), self.zeros[:groups].t().contiguous()
        if self.perm is None:
            return QTensor(codes.contiguous(), scales, zeros, 4, self.group_size)
        unperm = torch.argsort(self.perm)
        channel_groups = torch.arange(self.in_features, device=codes.device) // self.group_size
        return QTensor(codes[:, unperm].contiguous(), scales, zeros, 4, self.group_size,
                       channel_groups[unperm].to(torch.int32))


def w4a16_reference(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over the dequantized weight: the oracle the kernel is tested against; any device."""
    return F.linear(x, w.dequantize(x.dtype), bias)


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters of one M bucket.  block_m == 1 selects the GEMV loop (one activation row per
    program; block_n a multiple of 32 * num_warps so that each thread holds whole columns), block_m >= 16
    the tensor-core tiles (one tl.dot of K = 32 per byte of the packed rows; scale_in_weight: see
    _tile_partial).  K is split over programs until about programs_per_sm programs per SM run."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    programs_per_sm: int
    scale_in_weight: bool = False


# H200 (132 SMs), one per M bucket: the configs with the least summed time over the four Llama-2-7B linears in
# tests/gpu/w4a16_sweep.py (M = 1: run H; tiles: run U; in run O the GEMV still beat every block_m 16 tile
# at M = 1; docs/perf-notes.md).  At M = 1 two columns per thread
# (block_n = 64 * num_warps) beat four: 171 registers at four left room for only 8 warps per SM (Nsight
# Compute, run H).  Without a config, M >= DEQUANT_GEMM_MIN_M runs dequantize + cuBLAS instead (the last
# bucket then only serves CUDA-graph capture and explicit configs).
M_BUCKETS: tuple[tuple[int, TileConfig], ...] = (
    (1, TileConfig(block_m=1, block_n=128, num_warps=2, num_stages=1, programs_per_sm=8)),
    (16, TileConfig(block_m=16, block_n=64, num_warps=4, num_stages=3, programs_per_sm=4)),
    (32, TileConfig(block_m=32, block_n=64, num_warps=4, num_stages=3, programs_per_sm=4, scale_in_weight=True)),
    (64, TileConfig(block_m=64, block_n=128, num_warps=8, num_stages=3, programs_per_sm=2, scale_in_weight=True)),
    (2**62, TileConfig(block_m=128, block_n=128, num_warps=8, num_stages=2, programs_per_sm=1, scale_in_weight=True)),
)
# From this many rows on, dequantizing W once into a scratch buffer and calling cuBLAS beats the fused
# tiles (as vLLM does for AWQ): the dequant is memory-bound and the GEMM runs at bf16 tensor-core speed.
DEQUANT_GEMM_MIN_M = 256
# Split-K programs store their float32 partial tiles into a per-device workspace [splits, M, N]; a second
# kernel sums them.  Splits are capped so that splits * M * N floats fit.
SPLIT_WORKSPACE_FLOATS = 1 << 22
MAX_SPLITS = 64
MAX_SPLIT_TILES = 1 << 16  # arrival counters per device: output tiles of one split GEMV launch
REDUCE_BLOCK = 1024  # output elements per program of the tiles' split-K reduction
SPLIT_CHUNK = tl.constexpr(16)  # partials the GEMV's last split loads at once (read by the kernel)
DEQUANT_BLOCK_N = 256  # output columns per program of the dequantization kernel


def _config_for(m: int) -> TileConfig:
    return next(config for bound, config in M_BUCKETS if m <= bound)


def w4a16_matmul(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None = None,
                 config: TileConfig | None = None) -> torch.Tensor:
    """x [..., K] fp16/bf16/fp32 (CUDA) -> [..., N] in x's dtype; config overrides the M-bucket table (and
    forces the fused kernel at any M)."""
    if x.dtype not in KERNEL_DTYPES or x.shape[-1] != w.in_features:
        raise LmcError(
            f"w4a16_matmul takes x [..., {w.in_features}] in fp16, bf16 or fp32, got {list(x.shape)} {x.dtype}; "
            "cast the activations to the model dtype"
        )
    rows = x.reshape(-1, w.in_features)
    if w.perm is not None:
        rows = rows.index_select(1, w.perm)
    if w.padded_in_features != w.in_features:
        rows = F.pad(rows, (0, w.padded_in_features - w.in_features))
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m = rows.shape[0]
    if config is None and m >= DEQUANT_GEMM_MIN_M and not _capturing(x.device):
        out = _dequantized_matmul(rows, w, bias)
    else:
        out = torch.empty(m, w.out_features, device=x.device, dtype=x.dtype)
        if m:
            _launch(rows, w, bias, out, config or _config_for(m))
    return out.reshape(*x.shape[:-1], w.out_features)


def _capturing(device: torch.device) -> bool:
    # The dequant scratch buffer may be reallocated, so graph capture always takes the fused kernel.
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _launch(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None, out: torch.Tensor, config: TileConfig) -> None:
    m, n = out.shape
    blocks = w.padded_in_features // BLOCK_CHANNELS
    grid_m, grid_n = triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n)
    blocks_per_split = triton.cdiv(blocks, _split_count(config, m, n, grid_m * grid_n, blocks, x.device))
    splits = triton.cdiv(blocks, blocks_per_split)
    workspace, counters = _split_buffers(x.device)
    _w4a16_kernel[(grid_m, grid_n, splits)](
        x, w.qweight, w.scales, w.zeros, bias if bias is not None else out, out, workspace, counters,
        m, n, blocks, blocks_per_split, splits, x.stride(0), out.stride(0), MAGIC_BITS,
        GROUP=w.group_size, HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        SPLIT=splits > 1, SCALE_IN_WEIGHT=config.scale_in_weight,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", ASM=x.is_cuda and x.dtype != torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl_launch(x.device, wanted=config.block_m == 1),  # the GEMV only: the tiles gained nothing (run Z)
    )
    if splits > 1 and config.block_m > 1:
        _split_reduce_kernel[(triton.cdiv(m * n, REDUCE_BLOCK),)](
            workspace, bias if bias is not None else out, out, m * n, n, splits,
            HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK, num_warps=4,
        )


def _split_count(config: TileConfig, m: int, n: int, tiles: int, blocks: int, device: torch.device) -> int:
    """K splits per output tile: enough programs for programs_per_sm per SM, as many as the workspace holds,
    each split long enough that its float32 partial (4 * BM * BN bytes stored, then read back) stays under a
    quarter of the operand bytes it reads (per block of 128 channels: 256 * BM of x, 64 * BN of weights)."""
    wanted = config.programs_per_sm * sm_count(device) // tiles
    min_blocks = max(1, 16 * config.block_m * config.block_n // (256 * config.block_m + 64 * config.block_n))
    fits = SPLIT_WORKSPACE_FLOATS // (m * n) if tiles <= MAX_SPLIT_TILES else 1
    return max(1, min(wanted, blocks // min_blocks, fits, MAX_SPLITS))


@functools.cache
def _split_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K state on device, one stream at a time: the float32 [splits, M, N] partials (fully overwritten
    by each launch, never cleared) and int32 arrival counters per output tile (zero between launches: the
    last split of each tile resets its own)."""
    return (torch.empty(SPLIT_WORKSPACE_FLOATS, dtype=torch.float32, device=device),
            torch.zeros(MAX_SPLIT_TILES, dtype=torch.int32, device=device))


_dequant_scratch: dict[torch.device, torch.Tensor] = {}


def _dequantized_matmul(x: torch.Tensor, w: PackedW4, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K'] @ dequant(W) [K', N] (+ bias) by cuBLAS, through a per-device scratch buffer that grows to
    the largest weight seen and is reused by every layer (eager calls only: it may be reallocated)."""
    k_padded, n = w.padded_in_features, w.out_features
    size = k_padded * n * x.element_size()
    scratch = _dequant_scratch.get(x.device)
    if scratch is None or scratch.numel() < size:
        _dequant_scratch.pop(x.device, None)  # free the old buffer before allocating the bigger one
        scratch = _dequant_scratch[x.device] = torch.empty(size, dtype=torch.uint8, device=x.device)
    weight_t = scratch[:size].view(x.dtype).view(k_padded, n)
    _dequant_kernel[(k_padded // BLOCK_CHANNELS, triton.cdiv(n, DEQUANT_BLOCK_N))](
        w.qweight, w.scales, w.zeros, weight_t, n, GROUP=w.group_size, BLOCK_N=DEQUANT_BLOCK_N, num_warps=4,
    )
    return torch.matmul(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


@triton.jit
def _dequant_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, GROUP: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (b, n): channels [128b, 128b + 128) x columns [n * BN, +BN) of the weight, transposed:
    out [K', N] = ((q - z) * s) rounded once to out's dtype, equal to PackedW4.dequantize().t()."""
    block, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = block * 16 + tl.arange(0, 16)
    packed = tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)  # [16, BN]
    for plane in tl.static_range(8):  # plane j: channels 128b + 32 (j // 2) + 2r + j % 2 of the 16 rows r
        group = block * (128 // GROUP) + (16 * plane) // GROUP
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0).to(tl.float32)
        code = ((packed >> (4 * plane)) & 0xF).to(tl.float32)
        weight = ((code - zero[None, :]) * scale[None, :]).to(out_ptr.dtype.element_ty)
        channels = (block * 128 + 32 * (plane // 2) + 2 * tl.arange(0, 16) + plane % 2).to(tl.int64)
        tl.store(out_ptr + channels[:, None] * N + offs_n[None, :], weight, mask=n_mask[None, :])


@triton.jit
def _plane_params(scales_ptr, zeros_ptr, block, offs_n, n_mask, N, J: tl.constexpr, GROUP: tl.constexpr):
    """Scale (float32) and zero code (int32) [BN] of code plane J of a block: one group holds the plane."""
    index = (block * (128 // GROUP) + (16 * J) // GROUP) * N + offs_n
    scale = tl.load(scales_ptr + index, mask=n_mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + index, mask=n_mask, other=0).to(tl.int32)
    return scale, zero


@triton.jit
def _load_block(qweight_ptr, block, offs_n, mask, N):
    """[16, BN] int32: the packed rows of one block."""
    rows = block * 16 + tl.arange(0, 16)
    return tl.load(qweight_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)


@triton.jit
def _gemv_plane(x_row, half, block, J: tl.constexpr):
    """Code plane J of a block against its 16 channels of x (x_row: the even channels 2r of row m): ([16, BN]
    x * q * 2**-74, [16, 1] x).

    `half` holds the plane's nibble at bits 4P..4P+3, P = J for J < 6 (packed), J - 4 for 6 and 7 (packed
    >> 16): below bit 24, the float32 exponent.  The nibble masked where it sits reads as the float32
    denormal q * 2**(4P - 149), so x * 2**(75 - 4P) times it is x * q * 2**-74, exactly rounded.
    """
    P: tl.constexpr = J - 4 * (J // 6)
    x = tl.load(x_row + block * 128 + 32 * (J // 2) + J % 2).to(tl.float32)[:, None]
    q = (half & (0xF << (4 * P))).to(tl.float32, bitcast=True)
    return (x * (2.0 ** (75 - 4 * P))) * q, x


@triton.jit
def _gemv_partial(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, pid_m, offs_n, n_mask, N, block_start, block_end,
                  stride_xm, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """[1, BN] float32: row pid_m of x times the dequantized W over blocks [block_start, block_end).

    The sums over the 16 rows are taken once per group.  Planes 0-5 are masked where they sit (bits 0-23);
    6 and 7 from packed >> 16 (bits 8-15), since bits 24 up are the exponent.  The next block's load is
    issued before this block's math to keep two blocks of weights in flight per thread.  Exact for
    |x| < 2**52 (x * 2**75 must stay finite).  Under PDL (pdl.py) the first block's weights, which no earlier
    kernel writes, are requested before waiting for the kernel that wrote x.
    """
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    x_row = x_ptr + pid_m.to(tl.int64) * stride_xm + 2 * tl.arange(0, 16)
    packed = _load_block(qweight_ptr, block_start, offs_n, n_mask[None, :], N)
    wait_for_producers(PDL)
    for block in range(block_start, block_end):
        # The last iteration reloads its own block (a cache hit) instead of masking the prefetch.
        upcoming = _load_block(qweight_ptr, tl.minimum(block + 1, block_end - 1), offs_n, n_mask[None, :], N)
        for group in tl.static_range(128 // GROUP):  # the planes of one group share its zero and scale
            x_dot_q = tl.zeros([16, BLOCK_N], dtype=tl.float32)  # units of 2**-74
            x_sum = tl.zeros([16, 1], dtype=tl.float32)
            for plane in tl.static_range(GROUP // 16):
                if group * (GROUP // 16) + plane == 6:
                    # Shift in place once planes 0-5 are done: a separate high half would hold another
                    # [16, BN] int32 in registers while two blocks are in flight.
                    packed = packed >> 16
                x_q, x = _gemv_plane(x_row, packed, block, group * (GROUP // 16) + plane)
                x_dot_q += x_q
                x_sum += x
            scale, zero = _plane_params(scales_ptr, zeros_ptr, block, offs_n, n_mask, N, group * (GROUP // 16),
                                        GROUP)
            x_dot_w = tl.sum(x_dot_q, axis=0) * (2.0 ** 74) - zero.to(tl.float32) * tl.sum(x_sum, axis=0)
            acc += scale * x_dot_w
        packed = upcoming
    return acc[None, :]


@triton.jit
def _plane_weight(half, zero, magic, P: tl.constexpr):
    """Float32 q - z of the code plane at bits 4P..4P+3 of `half` (int32, any shape), exactly, in one LOP3 and
    one FFMA:
    the code masked in place and OR-ed into 2**23's mantissa reads as 2**23 + q * 16**P (< 2**24), and
    times 16**-P minus (2**(23 - 4P) + z) that is q - z."""
    shifted = ((half & (0xF << (4 * P))) | magic).to(tl.float32, bitcast=True)
    return shifted * (2.0 ** (-4 * P)) - (zero + 2.0 ** (23 - 4 * P))


# Code planes 2i and 2i + 1 of one packed row (channels 32i + 2r and 32i + 2r + 1, neighbours along K) as one
# half2 / bfloat162 of q - z, in PTX (Triton cannot split an int32 into two halves): prmt copies byte i into
# both halves (bf16: the high half from the row >> 4); one lop3 masks the nibble of each half into the
# mantissa of 1024 (fp16) or 128 (bf16), ORing in that exponent; one fma removes the offset and the zero,
# exactly (|q - z| <= 15).  fp16 keeps the high nibble in place, so its half reads 1024 + 16q and takes the
# factor 1/16.  $2: the row; $3, $4: the low and high halves' offsets; $5: the prmt selector.
_PAIR_ASM_FP16 = tl.constexpr("""{
    .reg .b32 t, offset, factor;
    prmt.b32 t, $2, 0, $5;
    lop3.b32 t, t, 0x00F0000F, 0x64006400, 0xEA;
    mov.b32 offset, {$3, $4};
    mov.b32 factor, 0x2C003C00;
    fma.rn.f16x2 t, t, factor, offset;
    mov.b32 {$0, $1}, t;
    }""")
_PAIR_ASM_BF16 = tl.constexpr("""{
    .reg .b32 t, offset, one;
    shr.u32 t, $2, 4;
    prmt.b32 t, $2, t, $5;
    lop3.b32 t, t, 0x000F000F, 0x43004300, 0xEA;
    mov.b32 offset, {$3, $4};
    mov.b32 one, 0x3F803F80;
    fma.rn.bf16x2 t, t, one, offset;
    mov.b32 {$0, $1}, t;
    }""")


@triton.jit
def _plane_pair(packed, zero, magic, BYTE: tl.constexpr, dtype: tl.constexpr, ASM: tl.constexpr):
    """q - z in dtype, exactly, of code planes 2 * BYTE and 2 * BYTE + 1 of packed [BN, 16] (uint32; zero
    [BN, 1] float32 codes): [BN, 32], column 2r + h = plane 2 * BYTE + h of row r = channel 32 * BYTE + 2r + h
    of the block.  ASM: the PTX above (CUDA); else float32 arithmetic (_plane_weight), which the Triton
    interpreter runs."""
    if ASM:
        # prmt selects byte BYTE into bytes 0 and 2 (fp16) or byte BYTE of the row and of the row >> 4 (bf16);
        # the fma adds -(1024 + z) and -(64 + z) (fp16: the high half reads 1024 + 16q, times 1/16) or
        # -(128 + z) to both halves (bf16)
        if dtype == tl.float16:
            select = tl.full([1, 1], BYTE * 0x0101 + 0x4040, tl.uint32)
            low_offset, high_offset = (-1024.0 - zero).to(dtype), (-64.0 - zero).to(dtype)
        else:
            select = tl.full([1, 1], BYTE * 0x0101 + 0x4400, tl.uint32)
            low_offset = (-128.0 - zero).to(dtype)
            high_offset = low_offset
        low, high = tl.inline_asm_elementwise(
            _PAIR_ASM_FP16 if dtype == tl.float16 else _PAIR_ASM_BF16, "=h,=h,r,h,h,r",
            [packed, low_offset, high_offset, select], dtype=(low_offset.dtype, low_offset.dtype), is_pure=True,
            pack=1)
    else:
        half = packed >> (16 * (BYTE // 2))
        low = _plane_weight(half, zero, magic, (2 * BYTE) % 4).to(dtype)
        high = _plane_weight(half, zero, magic, (2 * BYTE + 1) % 4).to(dtype)
    return tl.join(low, high).reshape(low.shape[0], 2 * low.shape[1])


@triton.jit
def _tile_partial(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, offs_m, m_mask, offs_n, n_mask, N, block_start,
                  block_end, stride_xm, magic, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, SCALE_IN_WEIGHT: tl.constexpr, ASM: tl.constexpr):
    """[BM, BN] float32: x[offs_m] times the dequantized W over blocks [block_start, block_end).

    Computed transposed, out^T [BN, BM] = W^T x^T, so that the dequantized weight is the left operand of
    Hopper's wgmma, which takes it from registers (x, the right one, comes from shared memory), and M from
    16 up is a valid wgmma N: with x on the left, M < 64 fell back to mma.sync and M = 64 staged every
    dequantized plane through shared memory with a fence (run L2: 1.1-1.2x faster at M = 16-32).
    A block's 16 packed rows are loaded once ([BN, 16] int32).  Byte i of those rows holds channels
    32i..32i+31 (_plane_pair makes them one [BN, 32] weight), one dot step of K = 32 against x's matching
    32 columns, so nothing is gathered.  The weight is the exact integer q - z in x's dtype and either
      * the group's float32 partial is scaled once (s * sum_k x_k (q_k - z); SCALE_IN_WEIGHT False), or
      * (q - z) * s is rounded to x's dtype first, as the reference does, and every dot accumulates into
        one accumulator (True): one multiply more per weight, one [BN, BM] float32 tile fewer, which at
        block_m >= 32 buys the occupancy that wins (run L3: 1.15x at M = 32-64).
    Reading the planes as one [128, BN] tile (a reshape of [8, 16, BN] or its transpose) made Triton move
    it through shared memory one half-word at a time (2x the instructions).
    """
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T: the weight is the dot's left operand
    x_cols = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + tl.arange(0, 32)[:, None]  # [32, BM]
    dtype = x_ptr.dtype.element_ty
    for block in range(block_start, block_end):
        rows = block * 16 + tl.arange(0, 16)
        packed = tl.load(qweight_ptr + rows[None, :] * N + offs_n[:, None], mask=n_mask[:, None], other=0)
        packed = packed.to(tl.uint32, bitcast=True)  # [BN, 16]
        for group in tl.static_range(128 // GROUP):
            scale, zero = _plane_params(scales_ptr, zeros_ptr, block, offs_n, n_mask, N, group * (GROUP // 16),
                                        GROUP)
            zero, scale = zero.to(tl.float32)[:, None], scale[:, None]
            part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            for pair in tl.static_range(GROUP // 32):
                weight = _plane_pair(packed, zero, magic, group * (GROUP // 32) + pair, dtype, ASM)  # [BN, 32]
                x = tl.load(x_cols + block * 128 + 32 * (group * (GROUP // 32) + pair), mask=m_mask[None, :],
                            other=0.0)  # [32, BM]
                if SCALE_IN_WEIGHT:
                    acc = tl.dot((weight.to(tl.float32) * scale).to(dtype), x, acc, input_precision=DOT_PRECISION)
                else:
                    part = tl.dot(weight, x, part, input_precision=DOT_PRECISION)
            if not SCALE_IN_WEIGHT:
                acc += scale * part
    return tl.trans(acc)


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, workspace_ptr, counters_ptr,
                  M, N, NUM_BLOCKS, BLOCKS_PER_SPLIT, SPLITS, stride_xm, stride_om, magic,
                  GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE_IN_WEIGHT: tl.constexpr, ASM: tl.constexpr,
                  PDL: tl.constexpr):
    """Program (m, n, s) computes output tile (m, n) over K split s; grid (cdiv(M, BM), cdiv(N, BN), splits).
    Split launches store the float32 partial to workspace [s, M, N]; for the GEMV the last split of a tile sums
    them, for tiles _split_reduce_kernel does.  PDL (launched so for the GEMV only): the GEMV waits for x's
    producer inside _gemv_partial, after its first weight loads; the tiles wait here."""
    allow_dependents(PDL)
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    block_start = pid_k * BLOCKS_PER_SPLIT
    block_end = tl.minimum(block_start + BLOCKS_PER_SPLIT, NUM_BLOCKS)
    if BLOCK_M == 1:
        acc = _gemv_partial(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, pid_m, offs_n, n_mask, N, block_start,
                            block_end, stride_xm, GROUP, BLOCK_N, PDL)
    else:
        wait_for_producers(PDL)
        acc = _tile_partial(x_ptr, qweight_ptr, scales_ptr, zeros_ptr, offs_m, m_mask, offs_n, n_mask, N,
                            block_start, block_end, stride_xm, magic, BLOCK_M, BLOCK_N, GROUP, DOT_PRECISION,
                            SCALE_IN_WEIGHT, ASM)
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT and BLOCK_M > 1:
        partial = workspace_ptr + pid_k.to(tl.int64) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial, acc, mask=mask)
    elif SPLIT:
        acc, last = _reduce_splits(acc, workspace_ptr, counters_ptr, pid_m, pid_n, pid_k, offs_n, n_mask, M, N,
                                   SPLITS, SPLIT_CHUNK)
        if last:
            _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, n_mask, mask, stride_om, HAS_BIAS)
    else:
        _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, n_mask, mask, stride_om, HAS_BIAS)


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, n_mask, mask, stride_om, HAS_BIAS: tl.constexpr):
    """out[offs_m, offs_n] = acc (+ bias), cast to out's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_splits(acc, workspace_ptr, counters_ptr, pid_m, pid_n, pid_k, offs_n, n_mask, M, N, SPLITS,
                   SPLIT_CHUNK: tl.constexpr):
    """Store this split's partial [1, BN] of row pid_m and count it in at the tile's counter.  Returns (sum
    of all partials, True) to the split that arrives last, which also resets the counter; (zeros, False) to
    the others.  The sum loads SPLIT_CHUNK partials at once, so the tail waits for about one L2 round trip
    per chunk rather than per split; its order is fixed, so the result is deterministic.

    The arrival is CUTLASS's semaphore: a CTA barrier orders every thread's partial store before one release
    atomic; its acquire (the result is broadcast through a barrier) orders the last split's loads after every
    other split's stores, and .cg loads skip this SM's L1.
    """
    tile_stride = M * N
    slot = workspace_ptr + pid_m * N + offs_n  # [BN]
    tl.store(slot[None, :] + pid_k.to(tl.int64) * tile_stride, acc, mask=n_mask[None, :])
    tl.debug_barrier()
    counter = counters_ptr + pid_m * tl.num_programs(1) + pid_n
    last = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1
    total = tl.zeros_like(acc)
    if last:
        for first in range(0, SPLITS, SPLIT_CHUNK):
            splits = first + tl.arange(0, SPLIT_CHUNK)
            partials = slot[None, :] + splits.to(tl.int64)[:, None] * tile_stride  # [SPLIT_CHUNK, BN]
            chunk = tl.load(partials, mask=(splits < SPLITS)[:, None] & n_mask[None, :], other=0.0,
                            cache_modifier=".cg")
            total += tl.sum(chunk, axis=0)[None, :]
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
    return total, last


@triton.jit
def _split_reduce_kernel(workspace_ptr, bias_ptr, out_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """out (contiguous [M, N], flat index i < MN) = sum over s of workspace[s * MN + i] (+ bias[i % N]), in
    a fixed order: deterministic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    partial = workspace_ptr + offs
    for _ in range(SPLITS):
        acc += tl.load(partial, mask=mask, other=0.0)
        partial += MN
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
