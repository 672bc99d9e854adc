"""ModelRunner against transformers: packed prefill, chunked prefill mixed with decodes,
shuffled block tables, prefix-cache hits, 4-bit checkpoints, KV dtypes and dummy weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, PreTrainedModel
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lmcompress.calib.kv_stats import KVRangeRecorder
from lmcompress.errors import LmcError
from lmcompress.formats import awq_gemm, gptq_v1
from lmcompress.formats.loader import load_dequantized_model
from lmcompress.formats.registry import tensors_for_linear
from lmcompress.quant.qtensor import QuantConfig
from lmcompress.quant.rtn import quantize_weight
from lmcompress.turbo.attention import context_slots
from lmcompress.turbo.forward_batch import ForwardBatch, SeqInput
from lmcompress.turbo.kv_cache import free_memory_budget
from lmcompress.turbo.model_runner import ModelRunner, RunnerOptions
from lmcompress.turbo.models.linear import FloatLinear, QuantLinear

VOCAB = 96
BLOCK = 4
NUM_BLOCKS = 64
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# Llama 3.1 scaling with a pretraining context short enough that the tests' positions use every band.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**TINY, sliding_window=None, head_dim=16)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=True)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=32)),  # head_dim != hidden / heads
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def randomized(model: PreTrainedModel) -> PreTrainedModel:
    """Every parameter random, so biases and norm weights (initialised to 0 and 1) matter."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            param.copy_(1 + 0.2 * noise if "norm" in name else 0.08 * noise)
    return model.eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, PreTrainedModel]:
    torch.manual_seed(0)
    model = randomized(FAMILIES[request.param]())
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def hf_logits(model: PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0]  # [len, vocab]


class BlockPool:
    """Hands out block ids in a shuffled order, so block tables are neither contiguous nor sorted."""

    def __init__(self, seed: int):
        self.free = list(range(NUM_BLOCKS))
        random.Random(seed).shuffle(self.free)

    def table(self, num_tokens: int, shared: list[int] = ()) -> list[int]:
        needed = -(-num_tokens // BLOCK) - len(shared)
        return list(shared) + [self.free.pop() for _ in range(needed)]


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def runner_for(path: Path, **options) -> ModelRunner:
    return ModelRunner(path, RunnerOptions(block_size=BLOCK, num_blocks=NUM_BLOCKS, **options))


def prefill_all(runner: ModelRunner, prompts: list[list[int]], tables: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every prompt token, all prompts packed in one forward pass."""
    batch = runner.build_batch([SeqInput(p, 0, t, "all") for p, t in zip(prompts, tables)])
    return list(runner.forward(batch).split(batch.logit_counts))


def test_packed_prefill_matches_transformers(family):
    path, model = family
    runner = runner_for(path)
    rng, pool = random.Random(1), BlockPool(1)
    prompts = [random_tokens(rng, n) for n in (5, 13, 1, 22)]
    logits = prefill_all(runner, prompts, [pool.table(len(p)) for p in prompts])
    for prompt, got in zip(prompts, logits):
        torch.testing.assert_close(got, hf_logits(model, prompt), atol=1e-4, rtol=1e-4)


def run_staggered(runner: ModelRunner, seqs: list[tuple[list[int], int]], seed: int) -> list[torch.Tensor]:
    """Serve (tokens, prompt_len) pairs as an engine would: sequence i joins at step i, prompts go in
    random chunks of 1..7 tokens, then the remaining tokens one per step (teacher-forced decodes).
    Every step is one forward pass over all active sequences.  Returns each sequence's logits rows."""
    rng, pool = random.Random(seed), BlockPool(seed)
    tables = [pool.table(len(tokens)) for tokens, _ in seqs]
    done = [0] * len(seqs)
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    step = 0
    while any(d < len(tokens) for d, (tokens, _) in zip(done, seqs)):
        active = [i for i, (tokens, _) in enumerate(seqs) if i <= step and done[i] < len(tokens)]
        chunks = {}
        for i in active:
            tokens, prompt_len = seqs[i]
            chunks[i] = min(rng.randint(1, 7), prompt_len - done[i]) if done[i] < prompt_len else 1
        batch = runner.build_batch(
            [SeqInput(seqs[i][0][done[i]:done[i] + chunks[i]], done[i], tables[i], "all") for i in active]
        )
        for i, got in zip(active, runner.forward(batch).split(batch.logit_counts)):
            rows[i].append(got)
            done[i] += chunks[i]
        step += 1
    return [torch.cat(r) for r in rows]


def test_chunked_prefill_and_decodes_in_mixed_batches_match_transformers(family):
    path, model = family
    runner = runner_for(path)
    rng = random.Random(2)
    seqs = [(random_tokens(rng, prompt + decode), prompt) for prompt, decode in ((17, 6), (9, 9), (26, 3), (3, 12))]
    for (tokens, _), got in zip(seqs, run_staggered(runner, seqs, seed=2)):
        torch.testing.assert_close(got, hf_logits(model, tokens), atol=1e-4, rtol=1e-4)


def test_prefix_hit_reuses_blocks_of_another_sequence(family):
    path, model = family
    runner = runner_for(path)
    rng, pool = random.Random(3), BlockPool(3)
    shared_blocks = 2
    prefix = random_tokens(rng, shared_blocks * BLOCK)
    first = prefix + random_tokens(rng, 3)
    second = prefix + random_tokens(rng, 6)
    first_table = pool.table(len(first))
    runner.forward(runner.build_batch([SeqInput(first, 0, first_table, "none")]))
    # The second sequence is admitted with its first two blocks found in the prefix cache:
    # it computes only its own tokens, from position 8, next to another sequence's decode.
    second_table = pool.table(len(second), shared=first_table[:shared_blocks])
    other = random_tokens(rng, 5)
    other_table = pool.table(len(other))
    runner.forward(runner.build_batch([SeqInput(other[:4], 0, other_table, "none")]))
    batch = runner.build_batch([
        SeqInput(second[len(prefix):], len(prefix), second_table, "all"),
        SeqInput(other[4:], 4, other_table, "last"),
    ])
    got_second, got_other = runner.forward(batch).split(batch.logit_counts)
    torch.testing.assert_close(got_second, hf_logits(model, second)[len(prefix):], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_other[0], hf_logits(model, other)[-1], atol=1e-4, rtol=1e-4)


def test_logits_modes_select_rows(family):
    path, model = family
    runner = runner_for(path)
    rng, pool = random.Random(4), BlockPool(4)
    prompts = [random_tokens(rng, n) for n in (6, 3, 9)]
    batch = runner.build_batch(
        [SeqInput(p, 0, pool.table(len(p)), mode) for p, mode in zip(prompts, ("last", "none", "all"))]
    )
    assert batch.logit_counts == (1, 0, 9)
    last, none, everything = runner.forward(batch).split(batch.logit_counts)
    assert none.shape == (0, VOCAB) and everything.dtype == torch.float32
    torch.testing.assert_close(last[0], hf_logits(model, prompts[0])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(everything, hf_logits(model, prompts[2]), atol=1e-4, rtol=1e-4)


# --- 4-bit weights --------------------------------------------------------------------------------


def write_quantized(model: PreTrainedModel, fmt: str, cfg: QuantConfig, path: Path) -> Path:
    """RTN-quantize every decoder linear of model and save it packed in fmt ("awq" or "gptq")."""
    tied = model.config.tie_word_embeddings
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    for layer in range(model.config.num_hidden_layers):
        for linear in LINEARS:
            prefix = f"model.layers.{layer}.{linear}"
            qt = quantize_weight(state.pop(f"{prefix}.weight"), cfg, prefix)
            state.update(tensors_for_linear(prefix, qt, fmt))
    quant = awq_gemm.quantization_config(cfg) if fmt == "awq" else gptq_v1.quantize_config(cfg)
    path.mkdir()
    (path / "config.json").write_text(json.dumps(model.config.to_dict() | {"quantization_config": quant}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("fmt, arch", [("awq", "llama"), ("gptq", "qwen2")])
def test_quantized_checkpoint_matches_dequantized_transformers_model(tmp_path, fmt, arch):
    torch.manual_seed(0)
    cfg = QuantConfig(group_size=32, sym=fmt == "gptq")
    path = write_quantized(randomized(FAMILIES[arch]()), fmt, cfg, tmp_path / fmt)
    reference = load_dequantized_model(path)
    packed = runner_for(path)
    assert isinstance(packed.model.layers[0].mlp.gate_up_proj, QuantLinear)
    rng, pool = random.Random(5), BlockPool(5)
    prompts = [random_tokens(rng, n) for n in (7, 12)]
    for prompt, got in zip(prompts, prefill_all(packed, prompts, [pool.table(len(p)) for p in prompts])):
        torch.testing.assert_close(got, hf_logits(reference, prompt), atol=1e-4, rtol=1e-4)

    dequantized = runner_for(path, dequantize_weights=True)
    assert isinstance(dequantized.model.layers[0].mlp.gate_up_proj, FloatLinear)
    # Decoder linears hold 4 bits per weight (+ fp16 scale and uint8 zero per 32) instead of 32.
    linear_weights = sum(m.qweight.numel() * 8 for m in packed.model.modules() if isinstance(m, QuantLinear))
    saved = dequantized.weight_bytes() - packed.weight_bytes()
    assert saved == pytest.approx(linear_weights * (4 - 0.5 - 3 / 32), rel=1e-6)


# --- KV cache dtypes ------------------------------------------------------------------------------


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def mean_nll(logits: torch.Tensor, tokens: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(tokens[1:])).item()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_kv")
    randomized(FAMILIES["llama"]()).save_pretrained(path)
    return path


def test_quantized_kv_cache_logits_stay_close_to_float(llama_dir):
    rng = random.Random(6)
    seqs = [(random_tokens(rng, 30), 22), (random_tokens(rng, 18), 5)]
    reference = run_staggered(runner_for(llama_dir), seqs, seed=6)
    errors = {}
    for kv in ("int8", "int4"):
        got = run_staggered(runner_for(llama_dir, kv_cache_dtype=kv), seqs, seed=6)
        errors[kv] = max(relative_error(g, r) for g, r in zip(got, reference))
        nll_shift = max(abs(mean_nll(g, t) - mean_nll(r, t)) for g, r, (t, _) in zip(got, reference, seqs))
        assert nll_shift < (5e-3 if kv == "int8" else 5e-2)
    # Each extra bit halves the step: int8's error should be ~16x below int4's.
    assert 0 < errors["int8"] < 1e-2
    assert 8 * errors["int8"] < errors["int4"] < 0.2


def test_static_kv_scales_from_calibrated_ranges(llama_dir, tmp_path):
    """Record K/V ranges from a float pass (the calib/kv_stats.py tables), then serve with them."""
    calibrated = tmp_path / "calibrated"
    calibrated.mkdir()
    for name in ("config.json", "model.safetensors"):
        (calibrated / name).write_bytes((llama_dir / name).read_bytes())
    runner = runner_for(calibrated)
    rng, pool = random.Random(7), BlockPool(7)
    prompts = [random_tokens(rng, 40), random_tokens(rng, 25)]
    tables = [pool.table(len(p)) for p in prompts]
    reference = prefill_all(runner, prompts, tables)
    spec = runner.kv_spec
    recorder = KVRangeRecorder(spec.num_layers, spec.num_kv_heads, spec.head_dim)
    for prompt, table in zip(prompts, tables):
        slots = context_slots(torch.tensor(table), len(prompt), BLOCK)
        for index, layer in enumerate(runner.kv_cache.layers):
            keys, values = layer.read(slots, torch.float32)  # [len, heads, dim]
            recorder.observe(index, keys.transpose(0, 1)[None], values.transpose(0, 1)[None])
    recorder.save(calibrated)

    static = runner_for(calibrated, kv_cache_dtype="int8", kv_scales="static")
    assert static.kv_cache.layers[0].keys.meta is None  # codes only, no per-token scales
    for got, expected in zip(prefill_all(static, prompts, tables), reference):
        assert relative_error(got, expected) < 2e-2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_compute_stays_close_to_float32(llama_dir, dtype):
    rng = random.Random(8)
    seqs = [(random_tokens(rng, 20), 14), (random_tokens(rng, 9), 9)]
    reference = run_staggered(runner_for(llama_dir), seqs, seed=8)
    half = runner_for(llama_dir, dtype=dtype)
    assert half.kv_spec.dtype == dtype and half.model.embed_tokens.dtype == getattr(torch, dtype)
    got = run_staggered(half, seqs, seed=8)
    assert all(g.dtype == torch.float32 for g in got)
    assert max(relative_error(g, r) for g, r in zip(got, reference)) < (3e-2 if dtype == "bfloat16" else 5e-3)


# --- options, dummy mode, errors ------------------------------------------------------------------


def test_dummy_weights_from_config_alone(tmp_path, llama_dir):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    tables = [[3, 9], [5]]
    first = prefill_all(runner_for(config_only, dummy=True, seed=1), prompts, tables)
    again = prefill_all(runner_for(config_only, dummy=True, seed=1), prompts, tables)
    other_seed = prefill_all(runner_for(config_only, dummy=True, seed=2), prompts, tables)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.allclose(first[0], other_seed[0])
    assert all(torch.isfinite(x).all() and x.std() > 1e-3 for x in first)

    float_dummy = runner_for(config_only, dummy=True)
    w4 = runner_for(config_only, dummy=True, dummy_quant=QuantConfig(group_size=32))
    assert isinstance(w4.model.layers[1].self_attn.o_proj, QuantLinear)
    assert w4.weight_bytes() < float_dummy.weight_bytes() / 2
    assert torch.isfinite(prefill_all(w4, prompts, tables)[0]).all()


def test_pool_sized_from_a_byte_budget_or_free_memory(llama_dir):
    def runner(**options) -> ModelRunner:
        return ModelRunner(llama_dir, RunnerOptions(block_size=BLOCK, kv_cache_dtype="int4", **options))

    per_block = runner(num_blocks=1).kv_spec.bytes_per_block()
    by_budget = runner(kv_cache_budget=10 * per_block + per_block // 2)
    assert by_budget.num_blocks == 10
    assert by_budget.kv_cache_bytes() == 10 * per_block
    by_fraction = runner(kv_cache_memory_fraction=1e-6)  # of the available RAM: a few dozen blocks
    assert 1 <= by_fraction.num_blocks < 1e-5 * free_memory_budget(torch.device("cpu"), 1.0) / per_block


def test_runner_rejects_bad_input(llama_dir):
    runner = runner_for(llama_dir, max_model_len=20)
    with pytest.raises(LmcError, match="beyond max_model_len 20"):
        runner.forward(runner.build_batch([SeqInput(list(range(21)), 0, list(range(6)))]))
    with pytest.raises(LmcError, match="block size 8 but the KV cache 4"):
        runner.forward(ForwardBatch.build([SeqInput([1], 0, [0])], block_size=8))
    with pytest.raises(LmcError, match="static KV scales need an int8 or int4"):
        runner_for(llama_dir, kv_scales="static")
    with pytest.raises(LmcError, match="no kv_cache_scales.json"):
        runner_for(llama_dir, kv_cache_dtype="int4", kv_scales="static")
    with pytest.raises(LmcError, match="KV cache dtype 'fp8'"):
        RunnerOptions(kv_cache_dtype="fp8")
