"""bitsandbytes baselines: NF4 and LLM.int8() weights through transformers' BitsAndBytesConfig.

bitsandbytes quantizes while transformers loads the float checkpoint; the
quantized model is then saved with save_pretrained (its config.json gets a
"bitsandbytes" quantization_config), so its bytes on disk are real and
`lmc eval` reloads it as it is.  turbo does not run these weights: they are
evaluated through transformers, whose KV cache stays in the compute dtype,
float16 (the dtype bitsandbytes users run).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcompress.errors import LmcError
from lmcompress.output_dir import atomic_output_dir
from lmcompress.pipeline_io import copy_side_files
from lmcompress.resources import PeakMemory

BNB_METHODS = ("bnb-nf4", "bnb-int8")
COMPUTE_DTYPE = torch.float16
COMPUTE_DTYPE_NAME = "float16"


@dataclass(frozen=True)
class BnbSummary:
    seconds: float  # loading + quantizing, not saving
    memory_bytes: int  # held_bytes() of the quantized model
    peak_gpu_bytes: int | None  # torch's peak allocated GPU memory while loading + quantizing; None off CUDA
    config: dict  # the BitsAndBytesConfig used


def bnb_config(method: str):
    """NF4 (bitsandbytes' defaults: block 64, no double quantization) or LLM.int8() (outlier threshold 6.0)."""
    from transformers import BitsAndBytesConfig

    if method == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=COMPUTE_DTYPE)
    if method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise LmcError(f"unknown bitsandbytes method {method!r}; use one of {', '.join(BNB_METHODS)}")


def bnb_version() -> str | None:
    try:
        import bitsandbytes
    except ImportError:
        return None
    return bitsandbytes.__version__


def unavailable_reason(device: torch.device) -> str | None:
    """Why bitsandbytes cannot quantize on `device` here, or None when it can (probed on a small tensor)."""
    version = bnb_version()
    if version is None:
        return "bitsandbytes is not installed (pip install bitsandbytes==0.50.2)"
    import bitsandbytes.functional as bnb_functional

    try:
        probe = torch.ones(64, 64, dtype=COMPUTE_DTYPE, device=device)
        bnb_functional.quantize_4bit(probe, quant_type="nf4")
        bnb_functional.int8_vectorwise_quant(probe)
    except Exception as exc:  # bitsandbytes raises assorted types for a missing backend
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"bitsandbytes {version} cannot quantize on {device} ({first_line})"
    return None


def is_bnb_checkpoint(model_dir: str | Path) -> bool:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return False
    declared = json.loads(config_path.read_text()).get("quantization_config") or {}
    return declared.get("quant_method") == "bitsandbytes"


def quantize_bnb(src: str | Path, out: str | Path, method: str, device: torch.device) -> BnbSummary:
    """Load `src` quantized by bitsandbytes on `device` and save it to `out` (atomically, replacing it)."""
    from transformers import AutoModelForCausalLM

    config = bnb_config(method)
    start = time.perf_counter()
    with PeakMemory(device) as peak:
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config,
                                                     device_map=_device_map(device), dtype=COMPUTE_DTYPE)
    seconds = time.perf_counter() - start
    with atomic_output_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(Path(src), tmp)
    return BnbSummary(seconds=seconds, memory_bytes=held_bytes(model),
                      peak_gpu_bytes=peak.bytes if peak.kind == "gpu_allocated" else None, config=config.to_dict())


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct tensor storages the model holds: parameters, buffers and bitsandbytes'
    quantization state (NF4's absmax per 64 weights, LLM.int8()'s row scales), which transformers'
    get_memory_footprint() leaves out; a storage shared by several tensors counts once."""
    storages = {}
    for tensor in _held_tensors(model):
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _held_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        yield tensor
        state = getattr(tensor, "quant_state", None)  # Params4bit; nested (double) quantization chains state2
        while state is not None:
            yield from (t for t in (state.absmax, state.code, state.offset) if isinstance(t, torch.Tensor))
            state = state.state2
        scales = getattr(tensor, "SCB", None)  # Int8Params
        if isinstance(scales, torch.Tensor):
            yield scales


def load_bnb_model(model_dir: str | Path, device: torch.device):
    """A saved bitsandbytes checkpoint as a transformers model in eval mode."""
    from transformers import AutoModelForCausalLM

    reason = unavailable_reason(device)
    if reason is not None:
        raise LmcError(f"{model_dir} holds bitsandbytes weights but {reason}; evaluate it where bitsandbytes runs")
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=_device_map(device), dtype=COMPUTE_DTYPE)
    return model.eval()


def _device_map(device: torch.device) -> dict:
    """The whole model on `device`; accelerate places modules on an indexed CUDA device."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"": device}
