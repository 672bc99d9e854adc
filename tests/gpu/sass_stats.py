"""Static analysis of the W4A16 kernel without a GPU: compile it for sm_90 with the local triton (its bundled
ptxas), then print the registers per thread and, for each loop of the SASS, its instruction count by opcode.
Instructions per weight = the main loop's count / the weights one thread handles per iteration.

    python3 tests/gpu/sass_stats.py BLOCK_M BLOCK_N NUM_WARPS NUM_STAGES [--group 128] [--dtype fp16] [--no-asm] [--pdl]

(how docs/perf-notes.md's per-weight instruction counts were made; the GPU's triton may schedule a little
differently.)  Constexprs the kernel does not take are dropped, so the script also compiles older versions of
the kernel checked out with their tree, given their extra constexprs through --constexpr.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU's triton fuses a * b + c into one FMA
import triton  # noqa: E402  (after the environment it reads at import)
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lmcompress.turbo.kernels import w4a16  # noqa: E402

# Arguments the launch passes; the integers that are multiples of 16 at Llama shapes get Triton's
# divisibility hint, as the JIT gives them at run time (it decides the vector width of the loads).
SIGNATURE = {"x_ptr": "*{dtype}", "qweight_ptr": "*i32", "scales_ptr": "*{dtype}", "zeros_ptr": "*u8",
             "bias_ptr": "*{dtype}", "out_ptr": "*{dtype}", "workspace_ptr": "*fp32", "counters_ptr": "*i32",
             "M": "i32", "N": "i32", "NUM_BLOCKS": "i32", "BLOCKS_PER_SPLIT": "i32", "SPLITS": "i32",
             "stride_xm": "i32", "stride_om": "i32", "magic": "i32"}
ALIGNED = [name for name in SIGNATURE if name.endswith("_ptr")] + ["N", "NUM_BLOCKS", "stride_xm", "stride_om"]
BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")


def compile_sm90(args: argparse.Namespace) -> bytes:
    constexprs = {"GROUP": args.group, "HAS_BIAS": False, "BLOCK_M": args.block_m, "BLOCK_N": args.block_n,
                  "SPLIT": True, "DOT_PRECISION": "tf32", "SCALE_IN_WEIGHT": args.scale_in_weight,
                  "ASM": not args.no_asm, "PDL": args.pdl}
    constexprs.update((name, int(value)) for name, value in (item.split("=") for item in args.constexpr))
    constexprs = {name: value for name, value in constexprs.items() if name in w4a16._w4a16_kernel.arg_names}
    signature = {name: kind.format(dtype=args.dtype) for name, kind in SIGNATURE.items()}
    signature.update({name: "constexpr" for name in constexprs})
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in ALIGNED}
    source = ASTSource(fn=w4a16._w4a16_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": args.num_warps, "num_stages": args.num_stages})
    return kernel.asm["cubin"]


def loops(sass: str) -> list[collections.Counter]:
    """Opcode counts of every loop: the instructions from a backward branch's target to the branch."""
    instructions = [(int(m.group(1), 16), m.group(2), line) for line in sass.splitlines()
                    if (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line))]
    found = []
    for address, opcode, line in instructions:
        target = re.search(r"0x([0-9a-f]+)", line) if opcode.startswith("BRA") else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            found.append(collections.Counter(op.split(".")[0] for a, op, _ in instructions if start <= a <= address))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("block_m", "block_n", "num_warps", "num_stages"):
        parser.add_argument(name, type=int)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--scale-in-weight", action="store_true")
    parser.add_argument("--constexpr", nargs="*", default=[], metavar="NAME=INT",
                        help="more integer constexprs, for older versions of the kernel (e.g. BLOCK_K=64 before run L)")
    parser.add_argument("--no-asm", action="store_true", help="the interpreter's float32 dequantization")
    parser.add_argument("--pdl", action="store_true", help="with programmatic dependent launch's waits")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compile_sm90(args))
        cubin.flush()
        usage = subprocess.run([f"{BIN}/cuobjdump", "--dump-resource-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", cubin.name], capture_output=True, text=True,
                              check=True).stdout
    print("registers / thread:", re.search(r"REG:(\d+)", usage).group(1))
    for counts in loops(sass):
        print(f"loop of {sum(counts.values())} instructions:", dict(counts.most_common(24)))


if __name__ == "__main__":
    main()
