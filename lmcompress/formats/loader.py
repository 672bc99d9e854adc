"""Reading any supported checkpoint back: which weight format it holds, its linears
as QTensors or float weights, and a float model built from it.

`load_dequantized_model` is the CPU reference path that `lmc eval ppl` runs on
quantized checkpoints (lmc's own, AutoAWQ's, GPTQ v1): every packed linear is
dequantized to a plain `<prefix>.weight`, so the measurement reflects the
weights, not a kernel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

from lmcompress.checkpoint import Checkpoint
from lmcompress.errors import LmcError
from lmcompress.formats.registry import PACKED_SUFFIXES, READERS, supported_readers
from lmcompress.quant.qtensor import SUPPORTED_BITS, QTensor

CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"  # AutoGPTQ / GPTQModel write it next to config.json


@dataclass(frozen=True)
class WeightFormat:
    method: str  # "awq", "gptq", or "none" for float (fp16/bf16/fp32) weights
    version: str = ""  # awq: "gemm" | "gemv"; gptq: its checkpoint_format, "gptq"
    bits: int | None = None
    group_size: int | None = None  # -1: one group spanning all of in_features
    sym: bool | None = None
    desc_act: bool = False
    source: str = ""  # the file that declared it, for messages

    @property
    def quantized(self) -> bool:
        return self.method != "none"

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else int(self.group_size)


FLOAT_WEIGHTS = WeightFormat(method="none")


def detect_format(ckpt: Checkpoint) -> WeightFormat:
    """The format declared by config.json's quantization_config, else by quantize_config.json, else float."""
    declared, source = _declared_quantization(ckpt)
    if declared is None:
        return FLOAT_WEIGHTS
    # Old AutoGPTQ wrote quantize_config.json without quant_method.
    method = str(declared.get("quant_method", "gptq" if source == QUANTIZE_CONFIG_FILE else "")).lower()
    if method == "awq":
        if declared.get("zero_point") is False:
            raise LmcError(
                f"{source} declares AWQ without zero points (zero_point: false), which lmc cannot read; "
                "use a zero-point AWQ checkpoint (AutoAWQ's default) or quantize the float model with lmc quantize"
            )
        version = str(declared.get("version") or declared.get("format") or "gemm").lower()
        sym = False
    elif method == "gptq":
        version = str(declared.get("checkpoint_format") or declared.get("format") or "gptq").lower()
        sym = bool(declared.get("sym", True))
    else:
        raise LmcError(
            f"{source} has quant_method {method!r}, which lmc cannot read; lmc reads {supported_readers()} and "
            "float (fp16/bf16/fp32) checkpoints; quantize the float model with lmc quantize instead"
        )
    if (method, version) not in READERS:
        raise LmcError(
            f"{source} declares the {method} layout {version!r}, which lmc cannot read; lmc reads "
            f"{supported_readers()}; re-export the model in one of those or quantize the float model with "
            "lmc quantize"
        )
    return WeightFormat(
        method=method,
        version=version,
        bits=_declared_bits(declared, source),
        group_size=_declared_group_size(declared, source),
        sym=sym,
        desc_act=bool(declared.get("desc_act", False)),
        source=source,
    )


def quantized_linear_names(ckpt: Checkpoint) -> list[str]:
    """Prefixes of the packed linears (those with a `<prefix>.qweight`), in checkpoint order."""
    return [name.removesuffix(".qweight") for name in ckpt.tensor_names() if name.endswith(".qweight")]


def read_linear(ckpt: Checkpoint, prefix: str, fmt: WeightFormat | None = None) -> QTensor | torch.Tensor:
    """The linear at prefix (e.g. "model.layers.0.self_attn.q_proj"): a QTensor if packed, else its float weight."""
    fmt = fmt or detect_format(ckpt)
    expected = _expected_linear_shape(ckpt, prefix)
    if not ckpt.has(f"{prefix}.qweight"):
        weight = ckpt.get(f"{prefix}.weight")
        _check_against_config(ckpt, f"{prefix}.weight", tuple(weight.shape), expected)
        return weight
    if not fmt.quantized:
        raise LmcError(
            f"{ckpt.path} stores {prefix} packed ({prefix}.qweight) but {CONFIG_FILE} has no quantization_config; "
            f"restore the {CONFIG_FILE} written together with these weights"
        )
    tensors = {key: ckpt.get(f"{prefix}.{key}") for key in PACKED_SUFFIXES if ckpt.has(f"{prefix}.{key}")}
    qt = READERS[(fmt.method, fmt.version)](tensors, fmt.group_size_for(expected[1]), name=prefix)
    _check_against_config(ckpt, f"{prefix}.qweight", qt.shape, expected)
    return qt


def load_state_dict(path: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain Hugging Face state dict: packed linears dequantized to `<prefix>.weight`, floats cast to dtype."""
    ckpt = Checkpoint(path)
    return _float_state_dict(ckpt, detect_format(ckpt), dtype)


def load_dequantized_model(path: str | Path, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The checkpoint as a float transformers model in eval mode, quantized linears dequantized.

    The model is created without initialising weights and adopts the state dict's
    tensors, so the weights are held once; a tied lm_head is tied by transformers.
    """
    ckpt = Checkpoint(path)
    config = _float_config(ckpt)
    state = _float_state_dict(ckpt, detect_format(ckpt), dtype)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise LmcError(
            f"{ckpt.path} lacks {len(missing)} tensors the model needs (e.g. {', '.join(missing[:3])}); "
            "the checkpoint is incomplete, re-download or re-export it"
        )
    return model.to(device).eval()


def _float_state_dict(ckpt: Checkpoint, fmt: WeightFormat, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    shapes = _model_shapes(ckpt)
    packed = set(quantized_linear_names(ckpt))
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.tensor_names():
        prefix, _, suffix = name.rpartition(".")
        if prefix in packed and suffix in PACKED_SUFFIXES:
            if suffix == "qweight":
                state[f"{prefix}.weight"] = read_linear(ckpt, prefix, fmt).dequantize(dtype)
            continue
        tensor = ckpt.get(name)
        if name in shapes:
            _check_against_config(ckpt, name, tuple(tensor.shape), shapes[name])
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state


def _declared_quantization(ckpt: Checkpoint) -> tuple[dict | None, str]:
    declared = ckpt.config.get("quantization_config")
    source = CONFIG_FILE
    if declared is None and (ckpt.path / QUANTIZE_CONFIG_FILE).is_file():
        source = QUANTIZE_CONFIG_FILE
        try:
            declared = json.loads((ckpt.path / QUANTIZE_CONFIG_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise LmcError(f"{ckpt.path / QUANTIZE_CONFIG_FILE} is not valid JSON ({exc}); restore the file") from exc
    if declared is not None and not isinstance(declared, dict):
        raise LmcError(f"{source} quantization settings must be a JSON object, got {declared!r}; restore the file")
    return declared, source


def _declared_bits(declared: dict, source: str) -> int:
    bits = int(declared.get("bits", declared.get("w_bit", 4)))
    if bits not in SUPPORTED_BITS:
        raise LmcError(
            f"{source} declares {bits}-bit weights; lmc reads {'/'.join(map(str, SUPPORTED_BITS))}-bit "
            "checkpoints only; quantize the float model with lmc quantize --bits 4"
        )
    return bits


def _declared_group_size(declared: dict, source: str) -> int:
    group_size = int(declared.get("group_size", declared.get("q_group_size", 128)))
    if group_size != -1 and group_size <= 0:
        raise LmcError(f"{source} declares group_size {group_size}; it must be positive or -1 (one group per row)")
    return group_size


def _float_config_dict(ckpt: Checkpoint) -> dict:
    return {key: value for key, value in ckpt.config.items() if key != "quantization_config"}


def _float_config(ckpt: Checkpoint) -> PretrainedConfig:
    """The model's transformers config without its quantization_config (the model is built in float)."""
    return _config_from_dict(_float_config_dict(ckpt), ckpt.path)


def _config_from_dict(config: dict, path: Path) -> PretrainedConfig:
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise LmcError(
            f"{path / CONFIG_FILE} has model_type {model_type!r}, which this transformers version does not know; "
            "upgrade transformers or pass a checkpoint of a supported architecture"
        )
    return CONFIG_MAPPING[model_type].from_dict(config)


def _model_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model that config.json describes."""
    return _shapes_for_config(json.dumps(_float_config_dict(ckpt), sort_keys=True), str(ckpt.path))


@lru_cache(maxsize=4)
def _shapes_for_config(config_json: str, path: str) -> dict[str, tuple[int, ...]]:
    config = _config_from_dict(json.loads(config_json), Path(path))
    with torch.device("meta"):  # shapes only: no memory, about 2 s for a 70B config
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _expected_linear_shape(ckpt: Checkpoint, prefix: str) -> tuple[int, int]:
    shape = _model_shapes(ckpt).get(f"{prefix}.weight")
    if shape is None or len(shape) != 2:
        raise LmcError(
            f"{prefix} is not a linear layer of the model that {ckpt.path / CONFIG_FILE} describes; "
            "pass a prefix such as model.layers.0.self_attn.q_proj"
        )
    return shape


def _check_against_config(ckpt: Checkpoint, name: str, actual: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(actual) != tuple(expected):
        raise LmcError(
            f"{name} holds a {list(actual)} weight but {ckpt.path / CONFIG_FILE} implies {list(expected)}; "
            "the config does not belong to these weights, restore the config.json written with them"
        )
