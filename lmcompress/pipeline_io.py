"""The non-tensor files of a quantized checkpoint: configs, provenance, tokenizer files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lmcompress.checkpoint import INDEX_FILE, Checkpoint
from lmcompress.formats import awq_gemm, gptq_v1

PROVENANCE_FILE = "lmc_quantize.json"
# Files the quantized directory gets from the source as they are (tokenizer, chat template, generation config).
_NOT_COPIED = {"config.json", INDEX_FILE, "quantize_config.json", PROVENANCE_FILE}
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def output_configs(ckpt: Checkpoint, options, out_dir: Path, provenance: dict) -> None:
    """config.json with quantization_config (+ quantize_config.json for GPTQ) and lmc_quantize.json."""
    config = dict(ckpt.config)
    if options.fmt == "awq":
        config["quantization_config"] = awq_gemm.quantization_config(options.quant)
    else:
        gptq = gptq_v1.quantize_config(
            options.quant,
            desc_act=bool(options.method_options.get("act_order", False)),
            damp_percent=float(options.method_options.get("damp_percent", 0.01)),
            static_groups=bool(options.method_options.get("static_groups", False)),
            true_sequential=True,
        )
        config["quantization_config"] = gptq
        _write_json(out_dir / "quantize_config.json", gptq)
    config["torch_dtype"] = "float16"
    if "dtype" in config:
        config["dtype"] = "float16"
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / PROVENANCE_FILE, provenance)


def copy_side_files(src: Path, out_dir: Path) -> None:
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and not path.name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(path, out_dir / path.name)


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
