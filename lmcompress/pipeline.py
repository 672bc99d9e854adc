"""`lmc quantize`: calibrate and quantize a checkpoint one decoder layer at a time.

    embeddings(calibration tokens) -> hidden [n, seq, hidden]
    for each decoder layer:
        read its weights from the shards -> record K/V ranges -> quantize (method)
        -> hidden = layer(hidden) with the quantized weights -> write packed tensors
    copy embeddings, final norm, lm_head, tokenizer files; write configs and KV tables

Peak memory is one float32 layer plus the calibration activations, whatever the
depth of the model, because nothing else of the model is ever materialised.
"""

from __future__ import annotations

import json
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lmcompress import __version__
from lmcompress.calib.data import load_calibration_samples
from lmcompress.calib.kv_stats import KVRangeRecorder
from lmcompress.checkpoint import Checkpoint
from lmcompress.errors import LmcError
from lmcompress.formats.registry import tensors_for_linear
from lmcompress.output_dir import ShardedSafetensorsWriter, atomic_output_dir
from lmcompress.pipeline_io import copy_side_files, output_configs
from lmcompress.quant.layer import LayerContext
from lmcompress.quant.methods import method_named
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.resources import PeakMemory, resolve_device, tf32_matmuls

FORMATS = ("awq", "gptq")


@dataclass
class QuantizeOptions:
    method: str = "awq"
    quant: QuantConfig = field(default_factory=QuantConfig)
    fmt: str = "awq"
    calib_data: str = "pileval"
    calib_samples: int = 128
    calib_seqlen: int = 512
    seed: int = 42
    device: str = "auto"
    method_options: dict = field(default_factory=dict)
    max_shard_bytes: int = 2 * 1024**3

    def format_quant(self) -> QuantConfig:
        """The quantizer settings the output format can store (see QuantConfig.min_zero)."""
        needs_nonzero = self.fmt == "gptq" and not self.quant.sym
        return dataclasses.replace(self.quant, min_zero=1) if needs_nonzero else self.quant

    def check(self) -> None:
        if self.fmt not in FORMATS:
            raise LmcError(f"unknown --format {self.fmt!r}; use one of {', '.join(FORMATS)}")
        if self.fmt == "awq" and self.method_options.get("act_order"):
            raise LmcError("the AWQ format has no g_idx, so it cannot store act-order GPTQ weights; use --format gptq")
        if self.fmt == "awq" and self.quant.sym:
            raise LmcError("the AWQ GEMM format stores zero points; drop --sym or use --format gptq")


@dataclass
class QuantizeSummary:
    out_dir: str
    seconds: float
    peak_memory_bytes: int
    peak_memory_kind: str
    input_bytes: int
    output_bytes: int


def quantize_checkpoint(src: str | Path, out: str | Path, options: QuantizeOptions, overwrite: bool = False,
                        progress: bool = True) -> QuantizeSummary:
    options.check()
    ckpt = Checkpoint(src)
    _check_not_quantized(ckpt)
    _check_group_size(ckpt, options.quant)
    device = resolve_device(options.device)
    start = time.perf_counter()
    with PeakMemory(device) as peak, tf32_matmuls(device), atomic_output_dir(out, overwrite) as tmp:
        tokens = load_calibration_samples(
            options.calib_data, AutoTokenizer.from_pretrained(ckpt.path),
            n_samples=options.calib_samples, seq_len=options.calib_seqlen, seed=options.seed,
        )
        kv = _LayerwiseQuantizer(ckpt, options, device, tmp, progress).run(tokens)
        kv.save(tmp)
        output_configs(ckpt, options, tmp, provenance=_provenance(options, src))
        copy_side_files(ckpt.path, tmp)
    return QuantizeSummary(
        out_dir=str(out), seconds=time.perf_counter() - start,
        peak_memory_bytes=peak.bytes, peak_memory_kind=peak.kind,
        input_bytes=ckpt.total_bytes(), output_bytes=Checkpoint(out).total_bytes(),
    )


class _LayerwiseQuantizer:
    def __init__(self, ckpt: Checkpoint, options: QuantizeOptions, device: torch.device, out_dir: Path, progress: bool):
        self.ckpt, self.options, self.device, self.progress = ckpt, options, device, progress
        self.spec = ckpt.arch
        config = AutoConfig.from_pretrained(ckpt.path)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.config = self.skeleton.config
        self.writer = ShardedSafetensorsWriter(out_dir, options.max_shard_bytes)
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv = KVRangeRecorder(ckpt.num_layers, text.num_key_value_heads, head_dim)
        self.method = method_named(options.method)

    def run(self, tokens: torch.Tensor) -> KVRangeRecorder:
        """tokens [n_samples, seq_len] -> quantized layers written; returns the KV ranges."""
        hidden = self._embed(tokens)
        position_embeddings = self._rotary(hidden)
        layers = range(self.ckpt.num_layers)
        for index in tqdm(layers, desc=f"{self.options.method} layers", unit="layer", disable=not self.progress):
            hidden = self._quantize_layer(index, hidden, position_embeddings)
        self._write_non_layer_tensors()
        self.writer.close()
        return self.kv

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.ckpt.get(f"{self.spec.embed}.weight").to(self.device, torch.float32)
        hidden = torch.nn.functional.embedding(tokens.to(self.device), weight)  # [n, seq, hidden]
        _check_finite(hidden, "the embeddings of the calibration tokens")
        return hidden

    def _rotary(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary = type(self.skeleton.model.rotary_emb)(config=self.config).to(self.device)
        positions = torch.arange(hidden.shape[1], device=self.device)[None]
        return rotary(hidden[:1], positions)  # (cos, sin), each [1, seq, head_dim]

    def _load_layer(self, index: int) -> torch.nn.Module:
        layer = self.skeleton.model.layers[index].to_empty(device=self.device)
        state = {k: v.to(torch.float32) for k, v in self.ckpt.layer_state(index).items()}
        for name, tensor in state.items():
            _check_finite(tensor, f"weight {self.spec.layer_prefix(index)}{name}",
                          fix="the checkpoint is corrupt; re-download or re-export it")
        try:
            layer.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise LmcError(f"layer {index} of {self.ckpt.path} does not match its config.json ({first}); "
                           "check that config.json belongs to these weights") from None
        return layer

    def _quantize_layer(self, index: int, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        layer = self._load_layer(index)
        ctx = LayerContext(layer, hidden, position_embeddings, self.spec, self.options.format_quant(),
                           name=f"{self.spec.layers_prefix}.{index}")
        self._record_kv(index, ctx)
        qtensors = self.method(ctx, **self.options.method_options)
        hidden = ctx.batched(ctx.call_layer, hidden)
        _check_finite(hidden, f"activations after decoder layer {index}",
                      fix="calibrate in float32 on other data, or check the weights")
        self._write_layer(index, layer, qtensors)
        layer.to("meta")
        return hidden

    @torch.no_grad()
    def _record_kv(self, index: int, ctx: LayerContext) -> None:
        """K after (q/k norm and) RoPE and V, per KV head, on the float layer."""
        captured: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
        attn = ctx.module("self_attn")
        k_source = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        head_dim = self.kv.head_dim
        hooks = [
            k_source.register_forward_hook(lambda _m, _a, out: captured["k"].append(out)),
            attn.v_proj.register_forward_hook(lambda _m, _a, out: captured["v"].append(out)),
        ]
        try:
            for chunk in ctx.inputs.split(8):
                captured["k"].clear(), captured["v"].clear()
                ctx.call_layer(chunk)
                key = captured["k"][0].reshape(*chunk.shape[:2], -1, head_dim).transpose(1, 2)
                value = captured["v"][0].reshape(*chunk.shape[:2], -1, head_dim).transpose(1, 2)
                self.kv.observe(index, _apply_rope(key, *ctx.position_embeddings), value)
        finally:
            for hook in hooks:
                hook.remove()

    def _write_layer(self, index: int, layer: torch.nn.Module, qtensors: dict) -> None:
        prefix = self.spec.layer_prefix(index)
        missing = set(self.spec.linears) - set(qtensors)
        if missing:
            raise RuntimeError(f"method {self.options.method} left linears unquantized: {sorted(missing)}")
        for name, qt in qtensors.items():
            self.writer.add_all(tensors_for_linear(prefix + name, qt, self.options.fmt))
        linear_weights = {f"{name}.weight" for name in qtensors}
        for name, tensor in layer.state_dict().items():
            if name not in linear_weights:
                self.writer.add(prefix + name, tensor.to(torch.float16))

    def _write_non_layer_tensors(self) -> None:
        for name in self.ckpt.non_layer_names():
            self.writer.add(name, self.ckpt.get(name).to(torch.float16))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, heads, seq, head_dim]; cos/sin [1, seq, head_dim] (HF's half-rotation convention)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _check_finite(x: torch.Tensor, what: str, fix: str = "check the checkpoint and the calibration data") -> None:
    if not torch.isfinite(x).all():
        raise LmcError(f"NaN or inf in {what}; {fix}")


def _check_not_quantized(ckpt: Checkpoint) -> None:
    method = (ckpt.config.get("quantization_config") or {}).get("quant_method")
    if method or (ckpt.path / "quantize_config.json").is_file():
        raise LmcError(f"{ckpt.path} is already quantized ({method or 'gptq'}); pass the original float checkpoint")


def _check_group_size(ckpt: Checkpoint, quant: QuantConfig) -> None:
    """Every quantized linear's in_features must be a multiple of the group size."""
    cfg = ckpt.config
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    in_features = {
        "self_attn.o_proj": cfg["num_attention_heads"] * head_dim,
        "mlp.down_proj": cfg["intermediate_size"],
    }
    for name in ckpt.arch.linears:
        quant.check_divides(f"{ckpt.arch.layer_prefix(0)}{name}", in_features.get(name, cfg["hidden_size"]))


def _provenance(options: QuantizeOptions, src: str | Path) -> dict:
    record = asdict(options)
    record.update(source=str(src), lmcompress=__version__, torch=torch.__version__,
                  transformers=transformers.__version__)
    return json.loads(json.dumps(record, default=str))
