"""Dummy-weight checkpoints of real shapes: loadable by transformers, and marked as random in config.json."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from lmcompress import reference
from lmcompress.reference.dummy import DUMMY_WEIGHTS_KEY, LLAMA2_7B, has_dummy_weights, write_dummy_checkpoint
from lmcompress.reference.random_checkpoint import make_random_checkpoint

TINY = dict(LLAMA2_7B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=512)


def test_a_dummy_checkpoint_loads_with_transformers_and_says_its_weights_are_random(tmp_path):
    out = write_dummy_checkpoint(tmp_path / "dummy", TINY, tokenizer_dir=reference.REFERENCE_MODEL_DIR, seed=3)
    assert json.loads((out / "config.json").read_text())[DUMMY_WEIGHTS_KEY] is True
    assert has_dummy_weights(out) and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    up = model.model.layers[1].mlp.up_proj.weight
    assert up.shape == (256, 128) and 0.015 < up.float().std().item() < 0.025  # N(0, 0.02)
    assert torch.equal(model.model.norm.weight, torch.ones(128, dtype=torch.float16))
    # transformers carries the mark over when it saves the model again (as the bitsandbytes baselines do).
    model.save_pretrained(tmp_path / "resaved")
    assert has_dummy_weights(tmp_path / "resaved")


def test_trained_and_other_random_checkpoints_are_not_marked(tmp_path):
    assert not has_dummy_weights(reference.REFERENCE_MODEL_DIR)
    assert not has_dummy_weights(make_random_checkpoint(tmp_path / "random", "llama", num_hidden_layers=1))
    assert not has_dummy_weights(tmp_path / "no-such-model")
