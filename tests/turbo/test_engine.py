"""LLMEngine and LLM on the reference model: configuration, KV capacity, stop conditions, seeded
sampling, n choices, abort, unservable requests and failures that stay with their requests."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import torch

from lmcompress.errors import LmcError
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.config import EngineConfig
from lmcompress.turbo.engine import LLMEngine
from lmcompress.turbo.llm import LLM
from lmcompress.turbo.outputs import RequestOutput
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason

DEVICE = os.environ.get("LMC_TEST_DEVICE", "cpu")
BLOCK = 16
GREEDY = SamplingParams(temperature=0, max_tokens=24)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_llm(model: Path = REFERENCE_MODEL_DIR, **options) -> LLM:
    return LLM(model, **{"device": DEVICE, "block_size": BLOCK, "num_kv_blocks": 64, **options})


@pytest.fixture(scope="module")
def llm() -> LLM:
    return make_llm()


def step(engine: LLMEngine, outputs: dict[str, RequestOutput]) -> None:
    """One engine step, its outputs merged into `outputs` by request id."""
    for out in engine.step():
        earlier = outputs.get(out.request_id)
        outputs[out.request_id] = earlier.extended(out) if earlier else out


def run_to_end(engine: LLMEngine, outputs: dict[str, RequestOutput] | None = None) -> dict[str, RequestOutput]:
    outputs = {} if outputs is None else outputs
    while engine.has_unfinished():
        step(engine, outputs)
    return outputs


# --- configuration and capacity -------------------------------------------------------------------


@pytest.mark.parametrize("options, field", [
    (dict(device="gpu"), "device"),
    (dict(dtype="fp8"), "dtype"),
    (dict(kv_cache_dtype="int2"), "kv_cache_dtype"),
    (dict(kv_quant="per-channel"), "kv_quant"),
    (dict(kv_quant="static"), "kv_quant"),  # static scales with a float cache
    (dict(block_size=0), "block_size"),
    (dict(num_kv_blocks=-3), "num_kv_blocks"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(max_num_batched_tokens=1.5), "max_num_batched_tokens"),
    (dict(enable_prefix_caching="yes"), "enable_prefix_caching"),
    (dict(model=""), "model"),
])
def test_engine_config_names_the_bad_field(options, field):
    with pytest.raises(LmcError, match=rf"EngineConfig\.{field}\b"):
        EngineConfig(**{"model": REFERENCE_MODEL_DIR, **options})


def test_dtype_aliases_are_canonicalised():
    config = EngineConfig(model=REFERENCE_MODEL_DIR, dtype="bf16", kv_cache_dtype="fp16")
    assert (config.dtype, config.kv_cache_dtype) == ("bfloat16", "float16")


def capacity(model: Path, caplog, **options) -> int:
    budget = 4 * 2**20
    with caplog.at_level(logging.INFO, logger="lmcompress.turbo.engine"):
        engine = LLMEngine(EngineConfig(model=model, device=DEVICE, kv_cache_bytes=budget, **options))
    assert f"KV cache holds {engine.kv_capacity_tokens} tokens" in caplog.text
    assert engine.model_runner.kv_cache_bytes() <= budget
    return engine.kv_capacity_tokens


def test_int4_kv_holds_over_3_5x_the_tokens_of_fp16_in_the_same_bytes(tmp_path, caplog):
    quantized = tmp_path / "with-kv-scales"
    quantized.mkdir()
    for path in REFERENCE_MODEL_DIR.iterdir():
        (quantized / path.name).symlink_to(path.resolve())
    spec = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    layers, heads = spec["num_hidden_layers"], spec["num_key_value_heads"]
    table = {key: [[0.1] * heads] * layers for key in ("k_scale", "k_zero", "v_scale", "v_zero")}
    (quantized / "kv_cache_scales.json").write_text(json.dumps({"int4": table}))

    fp16 = capacity(quantized, caplog, kv_cache_dtype="fp16")
    int8 = capacity(quantized, caplog, kv_cache_dtype="int8")
    static_int4 = capacity(quantized, caplog, kv_cache_dtype="int4", kv_quant="static")
    dynamic_int4 = capacity(quantized, caplog, kv_cache_dtype="int4")
    # head_dim 64: codes 32 bytes per (token, head), plus 4 bytes of float16 scale/zero when dynamic.
    assert int8 >= 1.5 * fp16
    assert static_int4 >= 3.5 * fp16
    assert dynamic_int4 >= 3.5 * fp16


def test_dynamic_int4_kv_holds_over_3_5x_fp16_at_head_dim_128(tmp_path, caplog):
    """At the head_dim of the served 7B models the per-token scale/zero costs little."""
    config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text()) | {"head_dim": 128}
    model = tmp_path / "head-dim-128"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    options = dict(tokenizer=REFERENCE_MODEL_DIR, dummy_weights=True)
    fp16 = capacity(model, caplog, kv_cache_dtype="fp16", **options)
    assert capacity(model, caplog, kv_cache_dtype="int4", **options) >= 3.5 * fp16


# --- generation ------------------------------------------------------------------------------------


def test_stop_conditions_in_one_batch(llm):
    prompt = "And the king said unto"
    (base,) = llm.generate([prompt], GREEDY)
    ids, text = base.outputs[0].token_ids, base.outputs[0].text
    assert base.outputs[0].finish_reason is FinishReason.LENGTH and len(ids) == GREEDY.max_tokens
    stop_word = text.split()[4]
    stop_token = ids[6]
    llm.engine.eos_token_ids = frozenset({ids[3]})  # as if generation_config named it
    try:
        outs = llm.generate([prompt] * 5, [
            SamplingParams(temperature=0, max_tokens=24, stop=[stop_word], ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=24, stop=[stop_word], ignore_eos=True,
                           include_stop_str_in_output=True),
            SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[stop_token], ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=24),
            SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
        ])
    finally:
        llm.engine.eos_token_ids = frozenset({1, 3})
    stop_string, with_stop_string, stop_id, eos, ignoring_eos = (out.outputs[0] for out in outs)
    cut = text.index(stop_word)
    assert stop_string.text == text[:cut]
    assert (stop_string.finish_reason, stop_string.stop_reason) == (FinishReason.STOP, stop_word)
    assert with_stop_string.text == text[: cut + len(stop_word)]
    assert stop_id.token_ids == ids[: ids.index(stop_token) + 1] and stop_id.stop_reason == stop_token
    assert eos.token_ids == ids[:4] and (eos.finish_reason, eos.stop_reason) == (FinishReason.STOP, None)
    assert ignoring_eos.token_ids == ids and ignoring_eos.finish_reason is FinishReason.LENGTH


def test_seeded_request_samples_the_same_alone_and_batched():
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=20, logprobs=1)
    alone = make_llm(seed=1).generate(["The king said"], seeded)[0].outputs[0]

    engine = make_llm(seed=2).engine
    others = [SamplingParams(temperature=1.0, max_tokens=20), GREEDY, SamplingParams(temperature=0.7, seed=99)]
    outputs: dict[str, RequestOutput] = {}
    engine.add_request("other-0", "In the beginning", others[0])
    step(engine, outputs)
    engine.add_request("seeded", "The king said", seeded)
    engine.add_request("other-1", [0, 5, 6, 7, 8], others[1])
    step(engine, outputs)
    engine.add_request("other-2", "Grub, n.", others[2])
    batched = run_to_end(engine, outputs)["seeded"].outputs[0]
    assert batched.token_ids == alone.token_ids and batched.text == alone.text
    assert [lp.logprob for lp in batched.logprobs] == pytest.approx([lp.logprob for lp in alone.logprobs], abs=1e-4)


def test_repetition_penalty_sees_every_new_output_token_like_transformers(llm):
    """The engine builds each request's sampler row once; the penalty must still see the outputs of every step."""
    from transformers import AutoModelForCausalLM

    prompts = [[0, 5, 6, 7, 8], list(range(40, 52))]
    penalised = SamplingParams(temperature=0, repetition_penalty=1.8, max_tokens=16, ignore_eos=True)
    ours = [out.outputs[0].token_ids for out in llm.generate(prompts, penalised)]
    model = AutoModelForCausalLM.from_pretrained(REFERENCE_MODEL_DIR, dtype=torch.float32)
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                      do_sample=False, repetition_penalty=1.8)
        assert list(tokens) == expected[0, len(prompt):].tolist()
    plain = [out.outputs[0].token_ids for out in llm.generate(prompts, dataclasses.replace(penalised,
                                                                                           repetition_penalty=1.0))]
    assert plain != ours, "the penalty should change these outputs"


def test_text_decoded_at_the_end_matches_the_streamed_outputs(llm):
    engine = llm.engine
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=24, stop=[" the"])]  # stop strings stream regardless
    prompts = ["And the king said unto", "Grub, n.", "In the beginning"]
    finals, early_text = {}, {}
    for stream_text in (True, False):
        outputs: dict[str, RequestOutput] = {}
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(f"{stream_text}-{i}", prompt, p, stream_text=stream_text)
        early_text[stream_text] = ""
        while engine.has_unfinished():
            for out in engine.step():
                if not out.finished and not out.request_id.endswith("-2"):
                    early_text[stream_text] += out.outputs[0].text
                earlier = outputs.get(out.request_id)
                outputs[out.request_id] = earlier.extended(out) if earlier else out
        finals[stream_text] = [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason)
                               for _, o in sorted(outputs.items())]
    assert finals[False] == finals[True]
    assert early_text[True] and not early_text[False]


def test_launching_a_step_ahead_changes_no_output(monkeypatch):
    """The engine launches step N + 1 before it reads step N's tokens; LMC_OVERLAP=0 reads them first."""
    prompts = ["And the king said unto", "Grub, n.", "In the beginning", [0, 5, 6, 7, 8]]
    params = [SamplingParams(temperature=0, max_tokens=24, stop=[" the"]),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=20, logprobs=2),
              SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.5),
              SamplingParams(temperature=0, max_tokens=30)]
    runs = []
    for overlap in ("1", "0"):
        monkeypatch.setenv("LMC_OVERLAP", overlap)
        llm = make_llm()
        llm.engine.eos_token_ids = frozenset({llm.generate(prompts[3:], GREEDY)[0].outputs[0].token_ids[5]})
        runs.append([(c.token_ids, c.text, c.finish_reason, c.stop_reason, out.usage,
                      [lp.top for lp in c.logprobs or ()]) for out in llm.generate(prompts, params)
                     for c in out.outputs])
        assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks
    assert runs[0] == runs[1]
    assert [finish for _, _, finish, *_ in runs[0]] == [FinishReason.STOP, FinishReason.LENGTH, FinishReason.LENGTH,
                                                       FinishReason.STOP]


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU's default; CUDA overlaps unless LMC_OVERLAP=0")
def test_on_the_cpu_a_step_returns_its_own_token_unless_lmc_overlap_is_1(monkeypatch):
    firsts = {}
    for overlap in ("", "1"):
        if overlap:
            monkeypatch.setenv("LMC_OVERLAP", overlap)
        engine = make_llm().engine
        engine.add_request("r", "The king said", GREEDY)
        firsts[overlap] = [out.outputs[0].token_ids for out in engine.step()]
        run_to_end(engine)
    assert len(firsts[""]) == 1 and len(firsts[""][0]) == 1  # the prompt step's sampled token, at once
    assert firsts["1"] == []  # still on its way: the next step() reports it


def test_n_choices_are_the_single_requests_of_for_choice(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12)
    (together,) = llm.generate(["Grub, n."], params)
    singles = llm.generate(["Grub, n."] * 3, [params.for_choice(i) for i in range(3)])
    assert [c.index for c in together.outputs] == [0, 1, 2]
    assert [c.token_ids for c in together.outputs] == [s.outputs[0].token_ids for s in singles]
    assert len({c.token_ids for c in together.outputs}) > 1
    assert together.usage.completion_tokens == sum(len(c.token_ids) for c in together.outputs)


def test_repeated_prompt_reports_cached_prompt_tokens(llm):
    prompt = list(range(10, 10 + 3 * BLOCK + 5))
    first, second = (llm.generate([prompt], GREEDY)[0] for _ in range(2))
    assert first.outputs[0].token_ids == second.outputs[0].token_ids
    assert second.usage.cached_tokens == 3 * BLOCK and second.usage.prompt_tokens == len(prompt)


# --- abort, errors ---------------------------------------------------------------------------------


def test_abort_frees_blocks_at_once():
    engine = make_llm().engine
    engine.add_request("long", list(range(20, 120)), SamplingParams(temperature=0, max_tokens=200))
    engine.add_request("short", "The king said", GREEDY)
    for _ in range(3):
        engine.step()
    free_before = engine.stats().num_free_blocks
    assert engine.abort("long") and not engine.abort("unknown")
    assert engine.stats().num_free_blocks >= free_before + 100 // BLOCK
    assert engine.stats().num_running == 1
    outputs = run_to_end(engine)
    assert outputs["long"].finished and outputs["long"].outputs[0].finish_reason is FinishReason.ABORT
    assert outputs["short"].outputs[0].finish_reason is FinishReason.LENGTH
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_unservable_prompts_get_error_outputs_while_others_continue():
    llm = make_llm(max_model_len=128, num_kv_blocks=6)  # the pool holds 96 tokens
    outs = llm.generate([list(range(5, 205)), list(range(5, 105)), [], "The king said"], GREEDY)
    too_long, beyond_pool, empty, fine = (out.outputs[0] for out in outs)
    assert too_long.finish_reason is FinishReason.ERROR and "max_model_len is 128" in too_long.error
    assert beyond_pool.finish_reason is FinishReason.ERROR and "whole cache holds 96" in beyond_pool.error
    assert empty.finish_reason is FinishReason.ERROR and "empty prompt" in empty.error
    assert all(out.token_ids == () for out in (too_long, beyond_pool, empty))
    assert fine.finish_reason is FinishReason.LENGTH and len(fine.token_ids) == GREEDY.max_tokens


def test_output_reaching_max_model_len_finishes_with_length():
    llm = make_llm(max_model_len=40)
    (out,) = llm.generate([list(range(5, 35))], SamplingParams(temperature=0, max_tokens=100))
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason is FinishReason.LENGTH


def test_failed_forward_fails_only_that_steps_requests(monkeypatch):
    engine = make_llm().engine
    engine.add_request("doomed", "The king said", GREEDY)
    forward = engine.model_runner.forward

    def fail_once(batch):
        monkeypatch.setattr(engine.model_runner, "forward", forward)
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(engine.model_runner, "forward", fail_once)
    (failed,) = engine.step()
    assert failed.finished and failed.outputs[0].finish_reason is FinishReason.ERROR
    assert "RuntimeError: CUDA error" in failed.outputs[0].error
    engine.add_request("later", "The king said", GREEDY)
    assert run_to_end(engine)["later"].outputs[0].finish_reason is FinishReason.LENGTH
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks


def test_bad_requests_raise_lmc_errors(llm):
    with pytest.raises(LmcError, match=r"token ids must be integers in \[0, 8192\)"):
        llm.generate(["The king said", [1, 2, 9000]])
    llm.engine.step()  # reports the abort of the good prompt, queued before the bad one
    assert not llm.engine.has_unfinished() and llm.engine.stats().num_waiting == 0
    with pytest.raises(LmcError, match="temperature"):
        llm.generate(["x"], SamplingParams(temperature=-1))
    with pytest.raises(LmcError, match="one string"):
        llm.generate("The king said")
    with pytest.raises(LmcError, match="2 SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [GREEDY, GREEDY])
    with pytest.raises(LmcError, match="unknown engine option 'kv_dtype'"):
        LLM(REFERENCE_MODEL_DIR, kv_dtype="int8")
    llm.engine.add_request("twice", "x", GREEDY)
    with pytest.raises(LmcError, match="'twice' is already in flight"):
        llm.engine.add_request("twice", "y", GREEDY)
    run_to_end(llm.engine)


def checkpoint_view(tmp_path: Path, **config_changes) -> Path:
    """The reference model with config.json edited (weights symlinked)."""
    view = tmp_path / "view"
    view.mkdir()
    for path in REFERENCE_MODEL_DIR.iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path.resolve())
    config = json.loads((REFERENCE_MODEL_DIR / "config.json").read_text())
    (view / "config.json").write_text(json.dumps(config | config_changes))
    return view


@pytest.mark.parametrize("changes, message", [
    (dict(intermediate_size=512), "config.json implies"),
    (dict(quantization_config={"quant_method": "bitsandbytes", "bits": 4}), "quant_method 'bitsandbytes'"),
])
def test_bad_checkpoints_fail_with_one_line_errors(tmp_path, changes, message):
    with pytest.raises(LmcError, match=message) as error:
        make_llm(checkpoint_view(tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_missing_tokenizer_names_the_option(tmp_path):
    model = tmp_path / "config-only"
    model.mkdir()
    (model / "config.json").write_bytes((REFERENCE_MODEL_DIR / "config.json").read_bytes())
    with pytest.raises(LmcError, match="no tokenizer files.*EngineConfig.tokenizer"):
        make_llm(model, dummy_weights=True)
