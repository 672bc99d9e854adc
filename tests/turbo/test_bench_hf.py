"""bench_hf on the CPU with the reference model: exact token counts (EOS cannot end a row early),
consistent figures, dummy weights from config.json, seeded prompts, and bad settings."""

from __future__ import annotations

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo import bench_hf as bench

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoint_model():
    return bench.load_hf_model(REFERENCE_MODEL_DIR, dummy=False, dtype=torch.float32, device=CPU)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_figures_are_consistent(checkpoint_model, cache):
    result = bench.run_hf_bench(checkpoint_model, bench.HFBenchConfig(batch_size=3, input_len=8, output_len=5,
                                                                      cache=cache))
    t = result["throughput"]
    assert (t["completed"], t["input_tokens"], t["output_tokens"]) == (3, 24, 15)
    assert t["output_tok_s"] == pytest.approx(15 / t["elapsed_s"])
    assert t["total_tok_s"] == pytest.approx(39 / t["elapsed_s"])
    assert t["request_s"] == pytest.approx(3 / t["elapsed_s"])
    assert result["config"]["cache"] == cache and result["config"]["dtype"] == "float32"
    assert result["setup"]["warmup_s"] > 0
    assert result["memory"]["weight_bytes"] == sum(p.nbytes for p in checkpoint_model.parameters())


def test_eos_never_ends_a_row_early(checkpoint_model):
    # With an all-zero LM head every logit ties and greedy picks token 0; make that the EOS token.
    model = bench.load_hf_model(REFERENCE_MODEL_DIR, dummy=True, dtype=torch.float32, device=CPU)
    model.lm_head.weight.data.zero_()
    model.generation_config.eos_token_id = 0
    result = bench.run_hf_bench(model, bench.HFBenchConfig(batch_size=2, input_len=4, output_len=6))
    assert result["throughput"]["output_tokens"] == 12


def test_dummy_weights_come_from_the_config_alone(checkpoint_model):
    dummy = bench.load_hf_model(REFERENCE_MODEL_DIR, dummy=True, dtype=torch.bfloat16, device=CPU, seed=1)
    assert dummy.dtype == torch.bfloat16
    assert dummy.config.hidden_size == checkpoint_model.config.hidden_size
    embed = dummy.get_input_embeddings().weight
    assert not torch.allclose(embed.float(), checkpoint_model.get_input_embeddings().weight)
    again = bench.load_hf_model(REFERENCE_MODEL_DIR, dummy=True, dtype=torch.bfloat16, device=CPU, seed=1)
    assert torch.equal(embed, again.get_input_embeddings().weight)  # seeded


def test_prompts_are_seeded_and_in_the_vocabulary():
    config = bench.HFBenchConfig(batch_size=4, input_len=16, output_len=1, seed=5)
    ids = bench.random_input_ids(config, 100, CPU)
    assert ids.shape == (4, 16) and 0 <= ids.min() and ids.max() < 100
    assert torch.equal(ids, bench.random_input_ids(config, 100, CPU))


def test_bad_settings_name_the_fix(tmp_path):
    with pytest.raises(LmcError, match="--cache must be one of static, dynamic"):
        bench.HFBenchConfig(batch_size=1, input_len=1, output_len=1, cache="paged")
    with pytest.raises(LmcError, match="--batch-size must be an integer >= 1"):
        bench.HFBenchConfig(batch_size=0, input_len=1, output_len=1)
    with pytest.raises(LmcError, match="has no config.json"):
        bench.load_hf_model(tmp_path, dummy=True, dtype=torch.float32, device=CPU)
