"""Sliding-window perplexity against a naive one-token-at-a-time loop and transformers' own loss."""

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmcompress.errors import LmcError
from lmcompress.evaluate import PerplexityResult, perplexity, sliding_windows, write_result_json

VOCAB, POSITIONS, NUM_TOKENS = 48, 64, 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """A tiny float64 Llama whose large random weights make predictions depend strongly on context."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config).double().eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (NUM_TOKENS,), generator=torch.Generator().manual_seed(1))


def naive_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Total NLL and count, one forward per token: token t is scored by the first window ending after t,
    with the tokens from that window's start up to t as context (none at the window's start: unscored)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for t in range(1, ids.numel()):
            begin = next(k * stride for k in range(ids.numel()) if min(k * stride + max_length, ids.numel()) > t)
            if begin == t:
                continue
            logits = model(input_ids=ids[begin:t][None], use_cache=False).logits[0, -1]
            total -= torch.log_softmax(logits, -1)[ids[t]].item()
            count += 1
    return total, count


@pytest.mark.parametrize("max_length, stride", [(16, 5), (16, 16), (8, 1)])
def test_sliding_window_matches_a_per_token_loop(model, ids, max_length, stride):
    expected_nll, expected_count = naive_nll(model, ids, max_length, stride)
    for batch_size in (1, 3):
        result = perplexity(model, None, ids, max_length=max_length, stride=stride, batch_size=batch_size)
        assert result.num_tokens == expected_count
        assert result.nll_mean == pytest.approx(expected_nll / expected_count, rel=1e-10)
        assert result.ppl == pytest.approx(math.exp(expected_nll / expected_count), rel=1e-10)


def test_scored_token_counts(model, ids):
    # stride < window: every token but the first; stride == window: the first of each window is lost too.
    assert perplexity(model, None, ids, max_length=16, stride=5).num_tokens == NUM_TOKENS - 1
    assert perplexity(model, None, ids, max_length=16, stride=16).num_tokens == NUM_TOKENS - 3
    # A last window of one token has nothing to score.
    assert perplexity(model, None, ids[:33], max_length=16, stride=16).num_tokens == 33 - 3


def test_overlap_gives_more_context_and_lower_perplexity_than_disjoint_windows(model, ids):
    overlapping = perplexity(model, None, ids, max_length=16, stride=4).ppl
    disjoint = perplexity(model, None, ids, max_length=16, stride=16).ppl
    assert abs(overlapping - disjoint) > 0.01 * disjoint  # context matters to this model


def test_one_window_equals_the_transformers_loss(model, ids):
    with torch.no_grad():
        loss = model(input_ids=ids[None], labels=ids[None]).loss.item()
    result = perplexity(model, None, ids[None], max_length=POSITIONS)
    assert result.nll_mean == pytest.approx(loss, rel=1e-6)  # transformers' loss runs in fp32
    assert (result.max_length, result.stride) == (POSITIONS, POSITIONS // 2)


def test_defaults_follow_the_model_positions(model, ids):
    result = perplexity(model, None, ids)
    assert (result.max_length, result.stride) == (POSITIONS, POSITIONS // 2)


def test_uniform_logits_give_the_vocabulary_size(ids):
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=POSITIONS,
    )
    uniform = LlamaForCausalLM(config)
    torch.nn.init.zeros_(uniform.lm_head.weight)
    result = perplexity(uniform, None, ids, max_length=16, stride=8)
    assert result.ppl == pytest.approx(VOCAB, rel=1e-5)
    assert result.nll_mean == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_text_is_tokenized_once_with_the_tokenizers_special_tokens(model):
    vocab = {word: i for i, word in enumerate(["[UNK]"] + [f"w{i}" for i in range(VOCAB - 1)])}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level)
    text = " ".join(f"w{(7 * i) % (VOCAB - 1)}" for i in range(40))
    ids = torch.tensor([vocab[word] for word in text.split()])
    assert perplexity(model, tokenizer, text, max_length=16) == perplexity(model, None, ids, max_length=16)


def test_sliding_windows_cover_each_token_once():
    for num_tokens, max_length, stride in [(50, 16, 5), (50, 16, 16), (7, 16, 3), (100, 10, 9)]:
        windows = sliding_windows(num_tokens, max_length, stride)
        scored = [t for w in windows for t in range(w.first_scored, w.end)]
        assert scored == sorted(set(scored)) and scored[-1] == num_tokens - 1
        assert all(w.end - w.begin <= max_length and w.first_scored > w.begin for w in windows)
        if stride < max_length:
            assert scored == list(range(1, num_tokens))


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(max_length=16, stride=17), "--stride"),
        (dict(max_length=16, stride=0), "--stride"),
        (dict(max_length=POSITIONS + 1), f"exceeds the model's {POSITIONS} positions"),
        (dict(max_length=1), "--max-length 2 or more"),
    ],
)
def test_bad_windows_raise(model, ids, kwargs, fragment):
    with pytest.raises(LmcError, match=fragment):
        perplexity(model, None, ids, **kwargs)


def test_one_token_text_raises(model):
    with pytest.raises(LmcError, match="at least 2"):
        perplexity(model, None, torch.tensor([3]))


def test_result_json_is_written_atomically_with_extra_fields(tmp_path):
    result = PerplexityResult(ppl=5.5, nll_mean=math.log(5.5), num_tokens=100, max_length=16, stride=8)
    fields = {"ppl": 5.5, "nll_mean": math.log(5.5), "num_tokens": 100, "max_length": 16, "stride": 8}
    assert json.loads(result.to_json()) == fields
    path = tmp_path / "out" / "ppl.json"
    path.parent.mkdir()
    path.write_text("old")
    write_result_json(path, result, {"model": "tiny", "eval_data": "wikitext2"})
    assert json.loads(path.read_text()) == {"model": "tiny", "eval_data": "wikitext2", **fields}
    assert [p.name for p in path.parent.iterdir()] == ["ppl.json"]  # no temp file left
    with pytest.raises(ValueError, match="ppl"):
        write_result_json(path, result, {"ppl": 1.0})
