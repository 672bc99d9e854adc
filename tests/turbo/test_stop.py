import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmcompress.errors import LmcError
from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.sequence import FinishReason
from lmcompress.turbo.stop import IncrementalDetokenizer, StopChecker, StopStringMatcher, StreamDelta

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café déjà vu.",
    "世界你好，今天天气很好。",
    "Emoji 🙂🚀 take four bytes each.",
    "END of the stream, stop here ###",
]


def train(pre_tokenizer, decoder, vocab_size: int, special_tokens: list[str], **trainer_args) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=trainer_args.pop("unk_token", None)))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizer, decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False, **trainer_args
    )
    tokenizer.train_from_iterator(SENTENCES * 3, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: merges cut multi-byte characters at byte boundaries."""
    tokenizer = train(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoders.ByteLevel(),
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", extra_special_tokens=["<|im_end|>"]
    )


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece style: the decoder drops the leading space of the first token it sees."""
    tokenizer = train(
        pre_tokenizers.Metaspace(), decoders.Metaspace(), vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>"
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, prompt: list[int], outputs: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens)
    return [detokenizer.step(token) for token in outputs] + [detokenizer.finish()]


def test_multi_byte_characters_are_held_back_until_complete(byte_level):
    text = "Hi 世界 🙂🚀 naïve café."
    ids = encode(byte_level, text)
    assert "\ufffd" in "".join(byte_level.decode([t]) for t in ids), "the tokenizer must split some characters"
    pieces = stream(byte_level, encode(byte_level, "Say: "), ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces[:-1]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_stream_equals_full_decode_of_random_tokens(byte_level, skip_special_tokens):
    rng = random.Random(0)
    special = byte_level.all_special_ids
    for _ in range(200):
        prompt = encode(byte_level, rng.choice(SENTENCES))
        outputs = [
            rng.choice(special) if rng.random() < 0.1 else rng.randrange(len(byte_level))
            for _ in range(rng.randrange(1, 30))
        ]
        expected = byte_level.decode(
            outputs, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False
        )
        assert "".join(stream(byte_level, prompt, outputs, skip_special_tokens)) == expected, outputs


def test_prompt_context_keeps_the_space_a_context_free_decode_drops(metaspace):
    ids = encode(metaspace, "The quick brown fox jumps over the lazy dog.")
    prompt, outputs = ids[:3], ids[3:]
    streamed = "".join(stream(metaspace, prompt, outputs))
    assert streamed == metaspace.decode(ids)[len(metaspace.decode(prompt)) :]
    assert streamed.startswith(" ") and metaspace.decode(outputs) == streamed[1:]


def test_tokenizer_without_tokenizers_backend_is_rejected():
    with pytest.raises(LmcError, match="not backed by the tokenizers library.*AutoTokenizer"):
        IncrementalDetokenizer(object(), [1, 2])


@pytest.mark.parametrize(
    ("stop", "chunks", "expected"),
    [
        (["###"], ["Hello #", "#", "# world"], [("Hello ", None), ("", None), ("", "###")]),
        (["###"], ["ab #", "#x"], [("ab ", None), ("##x", None)]),  # a false alarm is released
        (["aab"], ["a", "a", "a", "b"], [("", None), ("", None), ("a", None), ("", "aab")]),
        (["world", "lo w"], ["Hello world"], [("Hel", "lo w")]),  # earliest match wins
    ],
)
def test_stop_strings_across_chunks(stop, chunks, expected):
    matcher = StopStringMatcher(stop)
    assert [matcher.feed(chunk) for chunk in chunks] == expected
    assert matcher.text == "".join(shown for shown, _ in expected)


def test_stop_string_included_on_request_and_tail_released_at_the_end():
    included = StopStringMatcher(["###"], include_stop_str_in_output=True)
    assert [included.feed(c) for c in ["Hi #", "## more"]] == [("Hi ", None), ("###", "###")]
    assert included.text == "Hi ###"
    unfinished = StopStringMatcher(["###"])
    assert unfinished.feed("Hi ##") == ("Hi ", None)
    assert unfinished.feed("", final=True) == ("##", None)


def make_checker(tokenizer, **params) -> StopChecker:
    return StopChecker(SamplingParams(**params), tokenizer, encode(tokenizer, "Say: "), [tokenizer.eos_token_id])


def run(checker: StopChecker, ids: list[int]) -> list[StreamDelta]:
    deltas = []
    for token in ids:
        deltas.append(checker.append(token))
        if deltas[-1].finish_reason is not None:
            break
    return deltas


def per_character_ids(tokenizer, text: str) -> list[int]:
    """One token (or more) per character, so every multi-character string spans tokens."""
    return [token for char in text for token in encode(tokenizer, char)]


def test_stop_string_across_tokens_ends_the_output(byte_level):
    text = "Hello world. END of it"
    checker = make_checker(byte_level, stop=["END"], max_tokens=100)
    deltas = run(checker, per_character_ids(byte_level, text))
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (FinishReason.STOP, "END")
    assert len(deltas) == text.index("END") + 3
    assert checker.output_text == "Hello world. "
    # Streamed text is never taken back: its concatenation is the final output.
    assert "".join(d.text for d in deltas) == checker.output_text
    assert [d.text for d in deltas[-3:]] == ["", "", ""]


def test_stop_string_inside_a_split_multi_byte_character(byte_level):
    checker = make_checker(byte_level, stop=["界"], include_stop_str_in_output=True)
    deltas = run(checker, encode(byte_level, "Hi 世界 🙂"))
    assert deltas[-1].stop_reason == "界"
    assert checker.output_text == "".join(d.text for d in deltas) == "Hi 世界"


def test_eos_stops_and_its_text_is_left_out(byte_level):
    ids = encode(byte_level, "Hi there") + [byte_level.eos_token_id] + encode(byte_level, " more")
    checker = make_checker(byte_level, skip_special_tokens=False)
    deltas = run(checker, ids)
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (FinishReason.STOP, None)
    assert checker.output_text == "Hi there"
    kept = make_checker(byte_level, skip_special_tokens=False, include_stop_str_in_output=True)
    run(kept, ids)
    assert kept.output_text == "Hi there</s>"


def test_ignore_eos_runs_to_max_tokens(byte_level):
    ids = encode(byte_level, "Hi") + [byte_level.eos_token_id] + encode(byte_level, " there")
    checker = make_checker(byte_level, ignore_eos=True, max_tokens=len(ids))
    deltas = run(checker, ids)
    assert len(deltas) == len(ids) and deltas[-1].finish_reason is FinishReason.LENGTH
    assert checker.output_text == "Hi there"


def test_stop_token_id_is_reported_and_wins_over_length(byte_level):
    ids = encode(byte_level, "Hi there")
    checker = make_checker(byte_level, stop_token_ids=[ids[-1]], max_tokens=len(ids))
    deltas = run(checker, ids)
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == (FinishReason.STOP, ids[-1])
    assert checker.output_text == byte_level.decode(ids[:-1])


def test_length_releases_held_back_text(byte_level):
    # Ends on a possible stop-string start and inside a split character: both are output at the end.
    partial = next(t for t in encode(byte_level, "世界 🙂🚀") if byte_level.decode([t]).endswith("\ufffd"))
    ids = per_character_ids(byte_level, "Hi #") + [partial]
    checker = make_checker(byte_level, stop=["###"], max_tokens=len(ids))
    deltas = run(checker, ids)
    assert deltas[-1].finish_reason is FinishReason.LENGTH
    assert checker.output_text == "".join(d.text for d in deltas) == byte_level.decode(ids)
    assert checker.output_text.startswith("Hi #") and checker.output_text.endswith("\ufffd")


def test_flush_releases_held_text_of_a_sequence_ended_elsewhere(byte_level):
    partial = next(t for t in encode(byte_level, "🙂🚀") if byte_level.decode([t]).endswith("\ufffd"))
    ids = per_character_ids(byte_level, "Hi ##") + [partial]
    checker = make_checker(byte_level, stop=["###"], max_tokens=100)
    streamed = "".join(d.text for d in run(checker, ids))
    assert streamed == "Hi "
    assert streamed + checker.flush() == checker.output_text == byte_level.decode(ids)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_decoded_once_at_the_end_equals_the_stream(byte_level, metaspace, skip_special_tokens):
    rng = random.Random(1)
    for tokenizer in (byte_level, metaspace):
        for _ in range(100):
            prompt = encode(tokenizer, rng.choice(SENTENCES))
            outputs = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
            params = dict(max_tokens=len(outputs), skip_special_tokens=skip_special_tokens)
            streamed = run(StopChecker(SamplingParams(**params), tokenizer, prompt, [1]), outputs)
            deferred = StopChecker(SamplingParams(**params), tokenizer, prompt, [1], stream_text=False)
            once = run(deferred, outputs)
            assert [d.text for d in once[:-1]] == [""] * (len(once) - 1)
            assert once[-1].text == "".join(d.text for d in streamed) == deferred.output_text, outputs
            ends = [[(d.finish_reason, d.stop_reason) for d in deltas] for deltas in (once, streamed)]
            assert ends[0] == ends[1]


def test_text_without_a_stream_still_honours_stop_tokens_and_strings(byte_level):
    ids = encode(byte_level, "Hi there") + [byte_level.eos_token_id] + encode(byte_level, " more")
    for include in (False, True):
        checker = StopChecker(SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include),
                              byte_level, encode(byte_level, "Say: "), [byte_level.eos_token_id], stream_text=False)
        deltas = run(checker, ids)
        assert deltas[-1].text == checker.output_text == ("Hi there</s>" if include else "Hi there")
    # A stop string needs the text of every step, so it streams regardless.
    text = "Hello world. END of it"
    checker = StopChecker(SamplingParams(stop=["END"], max_tokens=100), byte_level, encode(byte_level, "Say: "),
                          stream_text=False)
    deltas = run(checker, per_character_ids(byte_level, text))
    assert deltas[-1].stop_reason == "END" and deltas[0].text == "H"
    assert "".join(d.text for d in deltas) == checker.output_text == "Hello world. "


def test_feeding_a_finished_sequence_is_a_caller_bug(byte_level):
    checker = make_checker(byte_level, max_tokens=1)
    assert checker.append(encode(byte_level, "Hi")[0]).finish_reason is FinishReason.LENGTH
    with pytest.raises(ValueError, match="already finished"):
        checker.append(5)
