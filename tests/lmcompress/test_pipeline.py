"""The layer-wise quantize pipeline end to end, on small random checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmcompress.calib.kv_stats import KV_SCALES_FILE
from lmcompress.errors import LmcError
from lmcompress.formats.loader import detect_format, load_dequantized_model
from lmcompress.checkpoint import Checkpoint
from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
from lmcompress.quant import methods
from lmcompress.quant.qtensor import QuantConfig
from lmcompress import reference
from lmcompress.reference.dummy import LLAMA2_7B, write_dummy_checkpoint
from lmcompress.reference.random_checkpoint import make_random_checkpoint

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _options(method: str = "rtn", **overrides) -> QuantizeOptions:
    base = dict(method=method, calib_data=str(reference.REFERENCE_CALIB), calib_samples=8, calib_seqlen=64, device="cpu")
    base.update(overrides)
    return QuantizeOptions(**base)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("src") / "llama", "llama", **SMALL)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method,fmt", [("rtn", "awq"), ("awq", "awq"), ("gptq", "gptq")])
def test_every_method_and_architecture_writes_a_loadable_checkpoint(tmp_path, arch, method, fmt):
    src = make_random_checkpoint(tmp_path / "src", arch, **SMALL)
    out = tmp_path / "out"
    summary = quantize_checkpoint(src, out, _options(method, fmt=fmt), progress=False)

    assert detect_format(Checkpoint(out)).method == fmt
    assert summary.output_bytes < summary.input_bytes
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    quantized = load_dequantized_model(out).eval()
    ids = torch.randint(0, fp.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = fp(ids).logits, quantized(ids).logits
    # 4-bit weights change the logits, but only by a fraction of their spread
    assert 0 < (got - ref).abs().mean() < 0.5 * ref.std()


def test_kv_tables_of_the_first_layer_match_the_keys_transformers_caches(tmp_path, llama_dir):
    out = tmp_path / "out"
    options = _options()
    quantize_checkpoint(llama_dir, out, options, progress=False)
    table = json.loads((out / KV_SCALES_FILE).read_text())

    from lmcompress.calib.data import load_calibration_samples
    from transformers import AutoTokenizer

    tokens = load_calibration_samples(options.calib_data, AutoTokenizer.from_pretrained(llama_dir),
                                      n_samples=options.calib_samples, seq_len=options.calib_seqlen, seed=options.seed)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    with torch.no_grad():
        cache = model(tokens, use_cache=True).past_key_values
    keys, values = cache.layers[0].keys, cache.layers[0].values  # [n, kv_heads, seq, head_dim], keys after RoPE
    torch.testing.assert_close(torch.tensor(table["ranges"]["k_max"][0]), keys.amax(dim=(0, 2)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(table["ranges"]["v_min"][0]), values.amin(dim=(0, 2)), rtol=1e-4, atol=1e-5)
    int4 = torch.tensor(table["int4"]["k_scale"])
    assert int4.shape == (SMALL["num_hidden_layers"], SMALL["num_key_value_heads"], keys.shape[-1])
    int8 = torch.tensor(table["int8"]["k_scale"])  # per head: every channel of a head shares one step
    assert torch.equal(int8, int8[..., :1].expand_as(int8)) and not torch.equal(int4, int4[..., :1].expand_as(int4))


def test_existing_output_is_refused_without_overwrite(tmp_path, llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(LmcError, match="already exists; pass --overwrite"):
        quantize_checkpoint(llama_dir, out, _options(), progress=False)
    quantize_checkpoint(llama_dir, out, _options(), overwrite=True, progress=False)
    assert (out / "config.json").is_file()


def test_interrupt_mid_run_leaves_nothing_half_written(tmp_path, llama_dir, monkeypatch):
    calls = []
    rtn = methods.METHODS["rtn"]

    def interrupted_on_second_layer(ctx, **options):
        calls.append(ctx.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return rtn(ctx, **options)

    monkeypatch.setitem(methods.METHODS, "rtn", interrupted_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(llama_dir, tmp_path / "out", _options(), progress=False)
    assert calls == ["model.layers.0", "model.layers.1"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: _edit_config(d, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
         "unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM"),
        (lambda d: _edit_config(d, quantization_config={"quant_method": "awq"}), "already quantized"),
    ],
)
def test_bad_source_directories_get_one_line_errors(tmp_path, llama_dir, mutate, message):
    src = tmp_path / "src"
    src.mkdir()
    for path in llama_dir.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    mutate(src)
    with pytest.raises(LmcError, match=message) as info:
        quantize_checkpoint(src, tmp_path / "out", _options(), progress=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(LmcError, match="is not a directory"):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "out", _options(), progress=False)


def test_group_size_that_does_not_divide_in_features(tmp_path):
    src = make_random_checkpoint(tmp_path / "src", "llama", **dict(SMALL, hidden_size=96, num_attention_heads=3,
                                                                   num_key_value_heads=1))
    with pytest.raises(LmcError, match="group size 64 does not divide in_features 96"):
        quantize_checkpoint(src, tmp_path / "out", _options(quant=QuantConfig(group_size=64)), progress=False)


def test_nan_weights_are_reported_with_the_tensor_name(tmp_path, llama_dir):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    for path in llama_dir.iterdir():
        (src / path.name).write_bytes(path.read_bytes())
    shard = next(src.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(LmcError, match=r"NaN or inf in weight model\.layers\.1\.mlp\.up_proj\.weight"):
        quantize_checkpoint(src, tmp_path / "out", _options(), progress=False)


def test_too_little_calibration_text_names_the_fix(tmp_path, llama_dir):
    short = tmp_path / "short.txt"
    short.write_text("only a few words of text\n")
    with pytest.raises(LmcError, match="calib"):
        quantize_checkpoint(llama_dir, tmp_path / "out", _options(calib_data=str(short)), progress=False)


def test_reference_model_awq_format_header_is_autoawq_compatible(tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(reference.REFERENCE_MODEL_DIR, out, _options("rtn"), progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True,
        "modules_to_not_convert": None,
    }
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


# glibc raises its mmap threshold after large frees and then keeps freed blocks in the heap, so
# anonymous RSS would count memory the pipeline already released; a fixed threshold returns it.
_RETURN_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
_PEAK_ANON_SCRIPT = """
import sys, threading, time
from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
peak = [0]
def watch():
    while True:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.005)
threading.Thread(target=watch, daemon=True).start()
options = QuantizeOptions(method='rtn', calib_data=sys.argv[3], calib_samples=4, calib_seqlen=64, device='cpu')
quantize_checkpoint(sys.argv[1], sys.argv[2], options, progress=False)
time.sleep(0.05)
print(peak[0])
"""


@pytest.mark.slow
def test_peak_memory_grows_with_one_layer_not_with_the_layer_count(tmp_path):
    """8 vs 2 layers of 64 MB (float32) each: loading the model would add 384 MB; one layer at a time adds ~0."""
    shape = dict(LLAMA2_7B, hidden_size=1024, intermediate_size=4096, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=8192)
    layer_bytes = (4 * 1024 * 1024 + 3 * 1024 * 4096) * 4
    peaks = {}
    for layers in (2, 8):
        src = write_dummy_checkpoint(tmp_path / f"src{layers}", dict(shape, num_hidden_layers=layers),
                                     tokenizer_dir=reference.REFERENCE_MODEL_DIR)
        run = subprocess.run([sys.executable, "-c", _PEAK_ANON_SCRIPT, str(src), str(tmp_path / f"out{layers}"),
                              str(reference.REFERENCE_CALIB)], capture_output=True, text=True, check=True,
                             env={**os.environ, **_RETURN_FREED_MEMORY})
        peaks[layers] = int(run.stdout.split()[-1])
    assert peaks[8] - peaks[2] < 1.5 * layer_bytes, peaks


def _edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
