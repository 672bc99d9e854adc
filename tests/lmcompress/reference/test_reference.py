"""The committed reference checkpoint, its tokenizer, and the random test checkpoints."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmcompress.reference as reference
from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_HELDOUT, REFERENCE_MODEL_DIR
from lmcompress.reference.corpus import read_documents
from lmcompress.reference.evaluate import fake_quantize_decoder_linears, perplexity, token_stream
from lmcompress.reference.random_checkpoint import CONFIG_CLASSES, make_random_checkpoint

METRICS = json.loads((REFERENCE_MODEL_DIR / "reference_metrics.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout_slice(tokenizer):
    """The first slice_windows windows of the held-out text, as the training run measured them.

    The ids of the first 300 documents (~25k tokens) are a prefix of the whole text's ids.
    """
    ids = token_stream(tokenizer, read_documents(REFERENCE_HELDOUT)[:300])
    n_tokens = METRICS["slice_windows"] * METRICS["seq_len"]
    assert ids.numel() > n_tokens
    return ids[:n_tokens]


def test_checkpoint_is_a_sharded_fp16_llama_under_40mb():
    config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config.get("dtype", config.get("torch_dtype")) == "float16"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_key_value_heads"]) == (384, 8, 2)
    index = json.loads((REFERENCE_MODEL_DIR / "model.safetensors.index.json").read_text())
    shards = {REFERENCE_MODEL_DIR / name for name in index["weight_map"].values()}
    assert len(shards) > 1
    assert all(shard.stat().st_size <= 15 * 2**20 for shard in shards)
    assert sum(shard.stat().st_size for shard in shards) <= 40 * 10**6


def test_tokenizer_round_trips_text_and_starts_with_bos(tokenizer):
    text = read_documents(REFERENCE_HELDOUT)[0] + "\n\nnaïve café — 42°, ünïcödé ✓ 中文"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode()) / 2  # merges were learned: far fewer tokens than bytes


def test_token_stream_equals_one_tokenizer_call(tokenizer):
    docs = read_documents(REFERENCE_HELDOUT)[:300]
    assert token_stream(tokenizer, docs).tolist() == tokenizer("\n\n".join(docs)).input_ids


def test_chat_template_renders_chatml(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define apple."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nDefine apple.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[:2] == tokenizer.convert_tokens_to_ids(["<s>", "<|im_start|>"])
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


def test_heldout_perplexity_reproduces_the_training_run(model, heldout_slice):
    ppl = perplexity(model, heldout_slice, seq_len=METRICS["seq_len"])
    assert 1.5 < ppl < 100  # an English model, far from the vocabulary size of a random one
    assert ppl == pytest.approx(METRICS["saved"]["slice_fp"], rel=2e-3)


def test_rtn_w4_g128_costs_perplexity_like_a_real_model(model, heldout_slice):
    quantized = copy.deepcopy(model)
    fake_quantize_decoder_linears(quantized, bits=4, group_size=128)
    w4 = perplexity(quantized, heldout_slice, seq_len=METRICS["seq_len"])
    assert w4 == pytest.approx(METRICS["saved"]["slice_w4g128"], rel=2e-3)
    # The fp slice ppl is checked against the same record by the test above.
    assert w4 / METRICS["saved"]["slice_fp"] - 1 >= 0.015
    assert METRICS["saved"]["w4g128_increase"] >= 0.02  # on the whole held-out split (Llama-2-7B: +4.8%)


def test_greedy_generation_stops_at_its_token_budget(model, tokenizer):
    prompt = tokenizer("In the beginning God created", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    continuation = tokenizer.decode(out[0, prompt.input_ids.shape[1] :], skip_special_tokens=True)
    assert 0 < out.shape[1] - prompt.input_ids.shape[1] <= 12
    assert continuation.strip()


@pytest.mark.parametrize("arch", sorted(CONFIG_CLASSES))
def test_random_checkpoint_loads_with_transformers(tmp_path, arch):
    path = make_random_checkpoint(tmp_path / arch, arch, max_shard_size="400KB")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.model_type == arch
    assert (path / "model.safetensors.index.json").is_file()
    logits = model(input_ids=torch.arange(1, 17)[None]).logits
    assert logits.shape == (1, 16, 8192) and torch.isfinite(logits).all()
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.bias is not None) == (arch == "qwen2")
    assert hasattr(attn, "q_norm") == (arch == "qwen3")
    # transformers picks a family-specific tokenizer class for qwen dirs; it must add no token.
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 8192 and tokenizer.pad_token_id == tokenizer.eos_token_id == 1


def test_random_checkpoint_has_outlier_channels_and_honours_overrides(tmp_path):
    path = make_random_checkpoint(
        tmp_path / "m", "llama", dtype=torch.bfloat16, num_hidden_layers=3, num_key_value_heads=4,
        tie_word_embeddings=True, outlier_channels=3, outlier_scale=10.0,
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.bfloat16
    assert len(model.model.layers) == 3 and model.config.num_key_value_heads == 4
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            assert (norm.weight == 10.0).sum() == 3 and (norm.weight == 1.0).sum() == 256 - 3


def test_random_checkpoint_with_a_small_vocab_gets_a_byte_tokenizer(tmp_path):
    path = make_random_checkpoint(tmp_path / "m", "qwen2", vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 260
    assert tokenizer.decode(tokenizer("héllo").input_ids, skip_special_tokens=True) == "héllo"


def test_bad_random_checkpoint_requests_raise_lmc_errors(tmp_path):
    with pytest.raises(LmcError, match="use one of llama, mistral, qwen2, qwen3"):
        make_random_checkpoint(tmp_path / "m", "gpt2")
    with pytest.raises(LmcError, match="vocab_size >= 260"):
        make_random_checkpoint(tmp_path / "m", "llama", vocab_size=100)


def test_missing_assets_raise_an_lmc_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(reference._PATHS, "REFERENCE_CALIB", tmp_path / "calib.txt")
    with pytest.raises(LmcError, match="pip install -e"):
        reference.REFERENCE_CALIB
