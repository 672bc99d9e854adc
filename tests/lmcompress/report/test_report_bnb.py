"""bitsandbytes baselines: a saved NF4/int8 checkpoint that reloads as it was and scores through transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmcompress.errors import LmcError
from lmcompress.report import bnb
from lmcompress.report.engines import TransformersEngine, open_engine

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed; pip install bitsandbytes==0.50.2")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    from lmcompress.reference.random_checkpoint import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("float") / "m", "llama", num_hidden_layers=1)


@pytest.mark.parametrize("method, weight_dtype", [("bnb-nf4", torch.uint8), ("bnb-int8", torch.int8)])
def test_quantize_bnb_saves_a_smaller_checkpoint_that_reloads_the_same(tmp_path, float_dir, method, weight_dtype):
    out = tmp_path / method
    summary = bnb.quantize_bnb(float_dir, out, method, CPU)
    assert bnb.is_bnb_checkpoint(out) and not bnb.is_bnb_checkpoint(float_dir)
    assert (out / "tokenizer.json").is_file()
    model = bnb.load_bnb_model(out, CPU)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == weight_dtype
    # get_memory_footprint() counts parameters and buffers; bitsandbytes' quantization state comes on top:
    # NF4 an fp32 absmax per 64 weights (and a 16-entry code book per linear), LLM.int8() an fp32 scale per row.
    linears = [m for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")]
    if method == "bnb-nf4":
        state = sum(m.in_features * m.out_features // 64 * 4 + 16 * 4 for m in linears)
    else:
        state = sum(m.out_features * 4 for m in linears)
    assert len(linears) == 7 and summary.memory_bytes == model.get_memory_footprint() + state
    assert summary.peak_gpu_bytes is None  # measured on CUDA only
    reference = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float16)
    assert summary.memory_bytes < reference.get_memory_footprint()
    ids = torch.randint(2, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reloaded = model(input_ids=ids).logits.float()
        fresh = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=bnb.bnb_config(method),
                                                     device_map={"": CPU}, dtype=torch.float16)(input_ids=ids).logits
    assert torch.equal(reloaded, fresh.float())


def test_bnb_scores_are_the_same_padded_in_a_batch_or_alone(tmp_path, float_dir):
    out = tmp_path / "nf4"
    bnb.quantize_bnb(float_dir, out, "bnb-nf4", CPU)
    engine = open_engine(out, "fp16", CPU)
    assert isinstance(engine, TransformersEngine) and engine.name == "transformers"
    pairs = [([0, 5, 9, 33], [7, 8]), ([0] + list(range(20, 60)), [3]), ([0, 4], [11, 12, 13, 14])]
    batched = engine.loglikelihoods(pairs)
    assert batched == pytest.approx([engine.loglikelihoods([pair])[0] for pair in pairs], abs=1e-3)
    with pytest.raises(LmcError, match="turbo does not run.*pass --kv-cache-dtype fp16"):
        open_engine(out, "int8", CPU)


def test_unknown_bnb_method_is_refused():
    with pytest.raises(LmcError, match="use one of bnb-nf4, bnb-int8"):
        bnb.bnb_config("bnb-fp4")


def test_bitsandbytes_runs_on_this_machine_and_says_why_where_it_cannot(monkeypatch):
    assert bnb.unavailable_reason(CPU) is None
    monkeypatch.setattr(bnb, "bnb_version", lambda: None)
    assert "pip install bitsandbytes==0.50.2" in bnb.unavailable_reason(CPU)
