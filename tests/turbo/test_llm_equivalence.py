"""turbo's engine against transformers generate(): greedy tokens identical for 32 concurrent,
staggered requests under prefix caching, chunked prefill and preemption; quantized checkpoints
against their dequantized transformers model.

Set LMC_TEST_DEVICE=cuda to run on a GPU (fp32 there as well, so tokens stay comparable).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lmcompress.formats.loader import load_dequantized_model
from lmcompress.pipeline import QuantizeOptions, quantize_checkpoint
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.reference import REFERENCE_CALIB, REFERENCE_HELDOUT, REFERENCE_MODEL_DIR
from lmcompress.reference.random_checkpoint import make_random_checkpoint
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import LLMEngine
from lmcompress.turbo.outputs import RequestOutput
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason

DEVICE = os.environ.get("LMC_TEST_DEVICE", "cpu")
NEWLINE = 202  # "\n" in the reference tokenizer: as an extra eos it ends many answers early
EOS = {1, 3, NEWLINE}
BLOCK = 16
PROMPT_LENGTHS = [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 300, 4, 6, 10, 17, 26, 40, 64, 96, 128, 190, 260]
SHARED_PREFIX = 160  # tokens; 8 prompts start with the same 160 tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_extra_eos(source: Path, dest: Path) -> Path:
    """A view of checkpoint `source` (symlinks) whose generation_config also ends on "\\n"."""
    dest.mkdir(exist_ok=True)
    for path in source.iterdir():
        if path.name != "generation_config.json":
            (dest / path.name).symlink_to(path.resolve())
    config = json.loads((source / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps(config | {"eos_token_id": sorted(EOS)}))
    return dest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return with_extra_eos(REFERENCE_MODEL_DIR, tmp_path_factory.mktemp("ref") / "model")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """32 token-id prompts of 1 to 300 tokens; every fourth shares a 160-token prefix with the others of its kind."""
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    docs = [doc for doc in REFERENCE_HELDOUT.read_text().split("\n\n") if doc.strip()][:300]
    stream = tokenizer("\n\n".join(docs))["input_ids"]
    shared = stream[:SHARED_PREFIX]
    mixed = [stream[1000 * i : 1000 * i + n] for i, n in enumerate(PROMPT_LENGTHS)]
    prefixed = [shared + stream[SHARED_PREFIX + 50 * i : SHARED_PREFIX + 50 * i + 2 + 5 * i] for i in range(8)]
    # Spread the prefixed prompts over the arrival waves, so later ones can hit earlier ones' blocks.
    out = list(mixed)
    for i, prompt in enumerate(prefixed):
        out.insert(4 * i + 3, prompt)
    return out


def max_tokens_of(index: int) -> int:
    return 4 + (7 * index) % 21  # 4 to 24


def hf_greedy(model: PreTrainedModel, prompt: list[int], max_new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def expected(model_dir, prompts) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    return [hf_greedy(model, prompt, max_tokens_of(i)) for i, prompt in enumerate(prompts)]


def engine_for(model_dir: Path, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, device=DEVICE, dtype="float32", block_size=BLOCK, **options))


def generate_staggered(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams],
                       wave: int = 8, steps_between_waves: int = 3) -> list[RequestOutput]:
    """Add `wave` requests, step a few times, add the next wave, ...; then run to the end."""
    outputs: dict[str, RequestOutput] = {}

    def step() -> None:
        for out in engine.step():
            earlier = outputs.get(out.request_id)
            outputs[out.request_id] = earlier.extended(out) if earlier else out

    for first in range(0, len(prompts), wave):
        for i in range(first, min(first + wave, len(prompts))):
            engine.add_request(f"r{i}", prompts[i], params[i])
        for _ in range(steps_between_waves):
            step()
    while engine.has_unfinished():
        step()
    return [outputs[f"r{i}"] for i in range(len(prompts))]


ENGINE_SETUPS = {
    "prefix-cache": dict(num_kv_blocks=512, enable_prefix_caching=True),
    "no-prefix-cache": dict(num_kv_blocks=512, enable_prefix_caching=False),
    "chunked-prefill": dict(num_kv_blocks=512, max_num_batched_tokens=32),
    # 24 blocks = 384 tokens: the longest request (324 tokens) fits alone, all 32 together by far do not.
    "preemption": dict(num_kv_blocks=24),
}


@pytest.mark.parametrize("overlap", ["1", "0"], ids=["overlapped", "step-by-step"])  # LMC_OVERLAP (engine.py)
@pytest.mark.parametrize("setup", list(ENGINE_SETUPS))
def test_greedy_tokens_match_transformers_generate(setup, overlap, model_dir, prompts, expected, monkeypatch):
    monkeypatch.setenv("LMC_OVERLAP", overlap)
    engine = engine_for(model_dir, **ENGINE_SETUPS[setup])
    params = [SamplingParams(temperature=0, max_tokens=max_tokens_of(i)) for i in range(len(prompts))]
    outputs = generate_staggered(engine, prompts, params)

    tokenizer = engine.tokenizer
    for prompt, out, want in zip(prompts, outputs, expected):
        (choice,) = out.outputs
        assert list(choice.token_ids) == want, f"prompt of {len(prompt)} tokens diverged"
        stopped = want[-1] in EOS
        assert choice.finish_reason is (FinishReason.STOP if stopped else FinishReason.LENGTH)
        shown = want[:-1] if stopped else want  # the eos token's text is left out
        assert choice.text == tokenizer.decode(shown, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == len(want)
    assert {o.outputs[0].finish_reason for o in outputs} == {FinishReason.STOP, FinishReason.LENGTH}

    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks
    cached = sum(out.usage.cached_tokens for out in outputs)
    if setup == "prefix-cache":
        assert stats.prefix_cache_hits > 0 and cached > 0
    if setup == "no-prefix-cache":
        assert stats.prefix_cache_hits == 0 and cached == 0
    if setup == "chunked-prefill":
        assert max(map(len, prompts)) > 32  # so some prompt really was split over steps
    if setup == "preemption":
        assert stats.num_preemptions > 0


# --- quantized checkpoints ------------------------------------------------------------------------


def quantized_reference(out: Path) -> Path:
    """The reference model, RTN 4-bit in the AWQ GEMM format."""
    options = QuantizeOptions(method="rtn", fmt="awq", quant=QuantConfig(group_size=128),
                              calib_data=str(REFERENCE_CALIB), calib_samples=4, calib_seqlen=64, device="cpu")
    quantize_checkpoint(REFERENCE_MODEL_DIR, out, options, progress=False)
    return out


def quantized_random_qwen2(out: Path) -> Path:
    """A random Qwen2 (q/k/v biases), GPTQ with act-order (g_idx) in the GPTQ v1 format."""
    src = make_random_checkpoint(out.parent / "qwen2-float", "qwen2")
    options = QuantizeOptions(method="gptq", fmt="gptq", quant=QuantConfig(group_size=64, sym=True),
                              calib_data=str(REFERENCE_CALIB), calib_samples=4, calib_seqlen=64, device="cpu",
                              method_options={"act_order": True})
    quantize_checkpoint(src, out, options, progress=False)
    return out


@pytest.mark.parametrize("make_checkpoint", [quantized_reference, quantized_random_qwen2])
def test_quantized_checkpoint_logprobs_match_dequantized_transformers(make_checkpoint, tmp_path, prompts):
    path = make_checkpoint(tmp_path / "quantized")
    reference = load_dequantized_model(path, device=DEVICE)
    engine = engine_for(path, num_kv_blocks=64)
    chosen = [prompts[i] for i in (1, 3, 9, 12)]
    params = [SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True)] * len(chosen)
    for prompt, out in zip(chosen, generate_staggered(engine, chosen, params, wave=2, steps_between_waves=1)):
        (choice,) = out.outputs
        tokens = list(prompt) + list(choice.token_ids)
        with torch.no_grad():
            logits = reference(torch.tensor([tokens], device=DEVICE)).logits[0].float()
        # Row p predicts token p + 1: the rows that chose the generated tokens.
        expected = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1).cpu()
        assert choice.token_ids == tuple(expected.argmax(dim=-1).tolist())
        for row, token, logprobs in zip(expected, choice.token_ids, choice.logprobs):
            assert logprobs.logprob == pytest.approx(row[token].item(), abs=1e-4)
            top_ids = [token_id for token_id, _ in logprobs.top]
            torch.testing.assert_close(torch.tensor([lp for _, lp in logprobs.top]), row[top_ids], atol=1e-4, rtol=0)
            assert set(top_ids) == set(row.topk(5).indices.tolist())
