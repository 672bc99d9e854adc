"""The reference model's training script: its schedule, its choice among candidates, and a run end to end."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmcompress.reference import REFERENCE_CALIB, REFERENCE_HELDOUT, REFERENCE_MODEL_DIR
from lmcompress.reference.corpus import read_documents, write_documents
from lmcompress.reference.train import TrainConfig, choose, lr_factor, main


def test_lr_factor_warms_up_linearly_then_follows_the_cosine_down_to_the_floor():
    cfg = TrainConfig(epochs=1, max_seconds=1, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 0.0, cfg) == pytest.approx(0.1)
    assert lr_factor(4, 0.0, cfg) == pytest.approx(0.5)
    assert lr_factor(9, 0.0, cfg) == pytest.approx(1.0)
    assert lr_factor(500, 0.5, cfg) == pytest.approx(0.55)
    assert lr_factor(1000, 1.0, cfg) == pytest.approx(0.1)
    assert lr_factor(1000, 2.0, cfg) == pytest.approx(0.1)  # a run past its budget stays at the floor


def _candidate(valid_loss: float, w4_increase: float) -> dict:
    return {"best_valid_loss": valid_loss, "heldout": {"w4g128_increase": w4_increase}}


def test_choose_takes_the_best_validation_loss_among_sensitive_candidates():
    results = [_candidate(3.0, 0.03), _candidate(2.5, 0.01), _candidate(2.8, 0.025)]
    assert choose(results, min_w4_increase=0.02) == 2


def test_choose_falls_back_to_the_most_sensitive_candidate():
    results = [_candidate(3.0, 0.015), _candidate(2.5, 0.01)]
    assert choose(results, min_w4_increase=0.02) == 0


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two few-step candidates of the small shape, on the calibration split (train) and held-out slices."""
    root = tmp_path_factory.mktemp("train")
    data, heldout_docs = root / "data", read_documents(REFERENCE_HELDOUT)
    data.mkdir()
    write_documents(data / "train.txt", read_documents(REFERENCE_CALIB))
    write_documents(data / "valid.txt", heldout_docs[:40])
    write_documents(root / "heldout.txt", heldout_docs[40:80])
    main(["--data", str(data), "--heldout", str(root / "heldout.txt"), "--tokenizer", str(REFERENCE_MODEL_DIR),
          "--out", str(root / "out"), "--shape", "small", "--epochs", "0.02", "0.04", "--batch-size", "2",
          "--max-seconds", "600", "--peak-lr", "3e-3", "--weight-decay", "0", "--adam-eps", "1e-10",
          "--device", "cpu"])
    return root / "out"


def test_training_saves_the_chosen_candidate_as_it_measured_it(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    chosen = metrics["candidates"][metrics["chosen"]]
    # the fp16 checkpoint read back scores what the candidate scored before it was saved
    assert metrics["saved"] == chosen["heldout"]
    assert [c["epochs"] for c in metrics["candidates"]] == [0.02, 0.04]
    assert metrics["candidates"][1]["steps"] == pytest.approx(2 * metrics["candidates"][0]["steps"], abs=1)
    model = AutoModelForCausalLM.from_pretrained(trained / "ref-llama")
    assert model.dtype == torch.float16
    assert model.config.max_position_embeddings == metrics["seq_len"] == 256


def test_training_records_the_recipe_from_the_command_line(trained):
    recipe = json.loads((trained / "metrics.json").read_text())["train_config"]
    assert (recipe["seq_len"], recipe["batch_size"]) == (256, 2)
    assert (recipe["peak_lr"], recipe["weight_decay"], recipe["adam_eps"]) == (3e-3, 0.0, 1e-10)


def test_training_learns(trained):
    history = json.loads((trained / "metrics.json").read_text())["candidates"][1]["history"]
    first_valid, best_valid = history[0][2], min(valid for _, _, valid in history)
    assert best_valid < first_valid
