"""Format detection, reading linears back and the dequantized model, on lmc- and AutoAWQ-written checkpoints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from lmcompress.checkpoint import Checkpoint
from lmcompress.errors import LmcError
from lmcompress.formats import awq_gemm, gptq_v1
from lmcompress.formats.loader import (
    WeightFormat,
    detect_format,
    load_dequantized_model,
    load_state_dict,
    quantized_linear_names,
    read_linear,
)
from lmcompress.formats.registry import tensors_for_linear
from lmcompress.quant.qtensor import QTensor, QuantConfig

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rtn(weight: torch.Tensor, group_size: int, g_idx: torch.Tensor | None = None) -> QTensor:
    """Asymmetric round-to-nearest (AutoAWQ's formula) with fp16 scales; g_idx chooses each channel's group."""
    out_features, in_features = weight.shape
    groups = torch.arange(in_features) // group_size if g_idx is None else g_idx.long()
    by_group = weight[:, torch.argsort(groups, stable=True)].reshape(out_features, -1, group_size)
    w_max, w_min = by_group.amax(dim=-1), by_group.amin(dim=-1)
    scales = ((w_max - w_min).clamp(min=1e-5) / 15).half().float()
    zeros = (-torch.round(w_min / scales)).clamp(0, 15)
    q = (torch.round(weight / scales[:, groups]) + zeros[:, groups]).clamp(0, 15)
    return QTensor(q.to(torch.uint8), scales, zeros.to(torch.uint8), 4, group_size, g_idx)


def write_checkpoint(
    path: Path, config: dict, tensors: dict[str, torch.Tensor], quantize_config: dict | None = None
) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    if quantize_config is not None:
        (path / "quantize_config.json").write_text(json.dumps(quantize_config))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(path / "model.safetensors"))
    return path


def quantize_llama(
    model: LlamaForCausalLM, fmt: str, group_size: int, out: Path
) -> tuple[Path, LlamaForCausalLM, dict[str, QTensor]]:
    """RTN-quantize every decoder linear and save it packed in fmt.

    Returns the checkpoint, a copy of the model holding the dequantized weights, and the QTensors.

    GPTQ uses a permuted g_idx (act-order grouping) to exercise it end to end.
    """
    reference = copy.deepcopy(model)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # shares the embedding's storage; save_pretrained leaves it out too
    qtensors = {}
    gen = torch.Generator().manual_seed(0)
    for layer in range(model.config.num_hidden_layers):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            module = reference.get_submodule(prefix)
            g_idx = None
            if fmt == "gptq":
                in_features = module.in_features
                g_idx = torch.empty(in_features, dtype=torch.int32)
                g_idx[torch.randperm(in_features, generator=gen)] = (torch.arange(in_features) // group_size).int()
            qt = rtn(module.weight.data, group_size, g_idx)
            qtensors[prefix] = qt
            module.weight.data = qt.dequantize()
            del state[f"{prefix}.weight"]
            state.update(tensors_for_linear(prefix, qt, fmt))
    cfg = QuantConfig(group_size=group_size)
    quant = awq_gemm.quantization_config(cfg) if fmt == "awq" else gptq_v1.quantize_config(cfg, desc_act=True)
    config = model.config.to_dict() | {"quantization_config": quant}
    return write_checkpoint(out, config, state), reference.eval(), qtensors


@pytest.fixture
def llama(tiny_llama):
    def make(tie: bool = False, num_layers: int = 2) -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama(num_layers=num_layers, tie=tie)).eval()
    return make


# --- detection ------------------------------------------------------------------------------------


def checkpoint_with(
    tmp_path: Path, tiny_llama, quantization_config: dict | None = None, quantize_config: dict | None = None
) -> Checkpoint:
    config = tiny_llama().to_dict()
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    tensors = {"model.norm.weight": torch.ones(128)}
    return Checkpoint(write_checkpoint(tmp_path / "ckpt", config, tensors, quantize_config))


def test_detects_float(tmp_path, tiny_llama):
    fmt = detect_format(checkpoint_with(tmp_path, tiny_llama))
    assert fmt == WeightFormat("none") and not fmt.quantized


def test_detects_awq_gemm(tmp_path, tiny_llama):
    ckpt = checkpoint_with(tmp_path, tiny_llama, awq_gemm.quantization_config(QuantConfig(group_size=64)))
    fmt = detect_format(ckpt)
    assert (fmt.method, fmt.version, fmt.bits, fmt.group_size, fmt.sym) == ("awq", "gemm", 4, 64, False)


def test_detects_awq_gemv_from_transformers_format_key(tmp_path, tiny_llama):
    # transformers v5 AwqConfig may spell the layout "format" instead of AutoAWQ's "version".
    declared = {"quant_method": "awq", "format": "gemv", "bits": 4, "group_size": 128, "zero_point": True}
    assert detect_format(checkpoint_with(tmp_path, tiny_llama, declared)).version == "gemv"


def test_detects_gptq_from_quantize_config_json(tmp_path, tiny_llama):
    # Old AutoGPTQ checkpoints: no quantization_config in config.json, no quant_method in quantize_config.json.
    declared = {"bits": 4, "group_size": -1, "desc_act": True, "sym": True, "damp_percent": 0.01}
    fmt = detect_format(checkpoint_with(tmp_path, tiny_llama, quantize_config=declared))
    assert (fmt.method, fmt.version, fmt.group_size, fmt.sym, fmt.desc_act) == ("gptq", "gptq", -1, True, True)
    assert fmt.source == "quantize_config.json" and fmt.group_size_for(256) == 256


def test_detects_gptq_from_config_json(tmp_path, tiny_llama):
    declared = gptq_v1.quantize_config(QuantConfig(group_size=32, sym=False))
    fmt = detect_format(checkpoint_with(tmp_path, tiny_llama, declared))
    assert (fmt.method, fmt.group_size, fmt.sym, fmt.source) == ("gptq", 32, False, "config.json")


@pytest.mark.parametrize(
    "declared, message",
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True},
         r"quant_method 'bitsandbytes'.*lmc reads awq \(gemm, gemv\), gptq \(gptq\) and float"),
        ({"quant_method": "gptq", "checkpoint_format": "gptq_v2", "bits": 4, "group_size": 128},
         r"gptq layout 'gptq_v2'.*lmc reads awq \(gemm, gemv\), gptq \(gptq\)"),
        ({"quant_method": "awq", "version": "gemv_fast", "bits": 4, "group_size": 128},
         r"awq layout 'gemv_fast'"),
        ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"8-bit weights; lmc reads 4-bit"),
        ({"quant_method": "awq", "zero_point": False, "bits": 4, "group_size": 128}, r"zero_point: false"),
    ],
)
def test_rejects_unsupported_declarations(tmp_path, tiny_llama, declared, message):
    with pytest.raises(LmcError, match=message):
        detect_format(checkpoint_with(tmp_path, tiny_llama, declared))


# --- lmc-written checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt, tie", [("awq", False), ("gptq", True)])
def test_dequantized_model_logits_equal_dequantized_weights_model(tmp_path, llama, fmt, tie):
    path, reference, _ = quantize_llama(llama(tie=tie), fmt, 32, tmp_path / fmt)
    loaded = load_dequantized_model(path)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    if tie:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_read_linear_returns_packed_qtensor_and_float_weights(tmp_path, llama, assert_same):
    model = llama(num_layers=1)
    path, _, qtensors = quantize_llama(model, "gptq", 64, tmp_path / "gptq")
    ckpt = Checkpoint(path)
    assert quantized_linear_names(ckpt) == sorted(qtensors)  # safetensors stores names sorted
    for prefix, qt in qtensors.items():
        assert_same(read_linear(ckpt, prefix), qt)
    lm_head = read_linear(ckpt, "lm_head")
    assert isinstance(lm_head, torch.Tensor) and torch.equal(lm_head, model.lm_head.weight.data)
    with pytest.raises(LmcError, match="model.layers.0.mlp is not a linear layer"):
        read_linear(ckpt, "model.layers.0.mlp")


def test_config_that_disagrees_with_weights_names_the_tensor(tmp_path, llama):
    path, _, _ = quantize_llama(llama(num_layers=1), "awq", 32, tmp_path / "awq")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 512}))
    message = r"model.layers.0.mlp.up_proj.qweight holds a \[256, 128\] weight but .* implies \[512, 128\]"
    with pytest.raises(LmcError, match=message):
        read_linear(Checkpoint(path), "model.layers.0.mlp.up_proj")
    with pytest.raises(LmcError, match=r"holds a \[.*\] weight but .* implies"):
        load_state_dict(path)


def test_packed_weights_without_quantization_config_are_an_error(tmp_path, llama):
    path, _, _ = quantize_llama(llama(num_layers=1), "awq", 32, tmp_path / "awq")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmcError, match="stores model.layers.0.* packed .* has no quantization_config"):
        load_state_dict(path)


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path, llama):
    path, _, _ = quantize_llama(llama(num_layers=1), "gptq", 32, tmp_path / "gptq")
    state = load_file(path / "model.safetensors")
    del state["model.norm.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(LmcError, match=r"lacks 1 tensors the model needs \(e.g. model.norm.weight\)"):
        load_dequantized_model(path)


def test_float_checkpoint_loads_as_is(tmp_path, llama):
    model = llama(num_layers=1)
    model.save_pretrained(tmp_path / "fp")
    state = load_state_dict(tmp_path / "fp")
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    ids = torch.arange(16)[None]
    with torch.no_grad():
        assert torch.equal(load_dequantized_model(tmp_path / "fp")(ids).logits, model(ids).logits)


# --- AutoAWQ-written checkpoints ------------------------------------------------------------------


@pytest.fixture(scope="module")
def autoawq_checkpoint(tmp_path_factory, tiny_llama) -> Path:
    """A tiny tied-embedding Llama quantized by AutoAWQ 0.2.9's own pipeline and saved by its save_quantized.

    This is AutoAWQ's full path (scale search, clip search, WQLinear_GEMM packing, save_quantized); it
    runs on CPU with transformers 5 for this model when calibration is given as token ids (no dataset
    download). One decoder layer keeps it to seconds.
    """
    awq = pytest.importorskip("awq")
    root = tmp_path_factory.mktemp("autoawq")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama(num_layers=1, tie=True)).half().save_pretrained(root / "fp16")
    model = awq.AutoAWQForCausalLM.from_pretrained(str(root / "fp16"), device_map="cpu")
    model.quantize(
        None, quant_config={"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"},
        calib_data=[[(7 * i + 3 * j) % 128 for j in range(64)] for i in range(8)],
        max_calib_seq_len=64, max_calib_samples=8,
    )
    model.save_quantized(str(root / "awq"))
    return root / "awq"


@pytest.mark.autoawq
def test_autoawq_checkpoint_loads_to_autoawq_dequantized_weights(autoawq_checkpoint):
    from awq.utils.packing_utils import dequantize_gemm

    ckpt = Checkpoint(autoawq_checkpoint)
    assert detect_format(ckpt) == WeightFormat("awq", "gemm", 4, 32, sym=False, source="config.json")
    state = load_state_dict(autoawq_checkpoint)
    prefixes = quantized_linear_names(ckpt)
    assert len(prefixes) == len(LINEARS)
    for prefix in prefixes:
        # AutoAWQ's dequantization in float32 (fp16 scales are exact there): [in, out]
        reference = dequantize_gemm(ckpt.get(f"{prefix}.qweight"), ckpt.get(f"{prefix}.qzeros"),
                                    ckpt.get(f"{prefix}.scales").float(), 4, 32)
        assert torch.equal(state.pop(f"{prefix}.weight"), reference.T)
    for name, tensor in state.items():  # embeddings and norms, copied
        assert torch.equal(tensor, ckpt.get(name).float())
    assert not ckpt.has("lm_head.weight")  # AutoAWQ drops the tied copy; the loader must tie it back
    model = load_dequantized_model(autoawq_checkpoint)
    assert torch.equal(model.lm_head.weight, ckpt.get("model.embed_tokens.weight").float())


@pytest.mark.autoawq
def test_gemv_checkpoint_packed_by_autoawq_reads_back(tmp_path, llama, assert_same):
    """A GEMV checkpoint whose linears AutoAWQ's WQLinear_GEMV packed (config as AutoAWQ writes for gemv)."""
    gemv = pytest.importorskip("awq.modules.linear.gemv")
    gemm_path, _, qtensors = quantize_llama(llama(num_layers=1), "awq", 32, tmp_path / "gemm")
    state = dict(load_file(gemm_path / "model.safetensors"))
    for prefix, qt in qtensors.items():
        linear = torch.nn.Linear(qt.shape[1], qt.shape[0], bias=False)
        linear.weight.data = qt.dequantize()
        packed = gemv.WQLinear_GEMV.from_linear(linear, 4, 32, scales=qt.scales, zeros=qt.zeros.float())
        state.update({f"{prefix}.{key}": getattr(packed, key) for key in awq_gemm.TENSOR_NAMES})
    config = json.loads((gemm_path / "config.json").read_text())
    config["quantization_config"]["version"] = "gemv"
    ckpt = Checkpoint(write_checkpoint(tmp_path / "gemv", config, state))
    assert detect_format(ckpt).version == "gemv"
    for prefix, qt in qtensors.items():
        assert_same(read_linear(ckpt, prefix), qt)
