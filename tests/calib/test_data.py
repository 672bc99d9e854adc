"""Calibration sampling and evaluation text from local files and (cached) named sets."""

import json
import random
import time
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pytest
import torch
from datasets.naming import filenames_for_dataset_split
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmcompress.calib.data import _hub_reachable, load_calibration_samples, load_eval_text
from lmcompress.errors import LmcError

EOS = "<eos>"
_WORDS = (
    "quantization keeps the weights small while the activations stay in half precision and the "
    "calibration data decides which channels matter most for the output of every linear layer"
).split()


def _documents(count: int = 60) -> list[str]:
    """Single-line paragraphs of 20 to 60 words (seeded, so every run sees the same text)."""
    rng = random.Random(0)
    return [f"Document {i}: " + " ".join(rng.choices(_WORDS, k=rng.randint(20, 60))) + "." for i in range(count)]


DOCUMENTS = _documents()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE trained here on the test documents (no Hub)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(DOCUMENTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


@pytest.fixture(autouse=True)
def private_datasets_cache(tmp_path, monkeypatch) -> Path:
    """An empty `datasets` cache per test: no named set is cached, nothing leaks into ~/.cache."""
    cache = tmp_path / "hf_datasets_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    return cache


def _write_txt(path: Path, documents: list[str]) -> Path:
    path.write_text("\n\n".join(documents) + "\n")
    return path


def _write_jsonl(path: Path, documents: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: doc, "id": i}) + "\n" for i, doc in enumerate(documents)))
    return path


def _stream_length(tokenizer, documents: list[str]) -> int:
    """Tokens of the documents, each followed by EOS."""
    return sum(len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1 for doc in documents)


def test_samples_are_blocks_of_document_text_separated_by_eos(tmp_path, tokenizer):
    source = _write_jsonl(tmp_path / "calib.jsonl", DOCUMENTS)
    samples = load_calibration_samples(str(source), tokenizer, n_samples=8, seq_len=64)
    assert samples.shape == (8, 64) and samples.dtype == torch.long
    assert len({tuple(row.tolist()) for row in samples}) == 8
    for row in samples:
        pieces = tokenizer.decode(row.tolist()).split(EOS)
        assert len(pieces) >= 2  # 64 tokens span a document boundary (documents are shorter)
        assert all(any(piece in doc for doc in DOCUMENTS) for piece in pieces)
        # Documents whole between two EOS: the order is shuffled, each is kept intact.
        assert all(piece in DOCUMENTS for piece in pieces[1:-1])


def test_sampling_is_deterministic_per_seed(tmp_path, tokenizer):
    source = str(_write_jsonl(tmp_path / "calib.jsonl", DOCUMENTS))
    first = load_calibration_samples(source, tokenizer, n_samples=6, seq_len=32, seed=7)
    again = load_calibration_samples(source, tokenizer, n_samples=6, seq_len=32, seed=7)
    other = load_calibration_samples(source, tokenizer, n_samples=6, seq_len=32, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_txt_jsonl_parquet_csv_and_directory_give_the_same_samples(tmp_path, tokenizer):
    txt = _write_txt(tmp_path / "calib.txt", DOCUMENTS)
    jsonl = _write_jsonl(tmp_path / "calib.jsonl", DOCUMENTS)
    parquet = tmp_path / "calib.parquet"
    datasets.Dataset.from_dict({"text": DOCUMENTS}).to_parquet(str(parquet))
    csv = tmp_path / "calib.csv"
    datasets.Dataset.from_dict({"text": DOCUMENTS}).to_csv(str(csv), index=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_jsonl(shards / "a.jsonl", DOCUMENTS[:25])
    _write_jsonl(shards / "b.jsonl", DOCUMENTS[25:])

    expected = load_calibration_samples(str(jsonl), tokenizer, n_samples=10, seq_len=48)
    for source in (txt, parquet, csv, shards):
        assert torch.equal(load_calibration_samples(str(source), tokenizer, n_samples=10, seq_len=48), expected)


def test_other_text_field_and_empty_documents(tmp_path, tokenizer):
    plain = _write_jsonl(tmp_path / "plain.jsonl", DOCUMENTS)
    # Empty and blank rows interleaved: skipped, yet they shift the seeded document order.
    with_blanks = _write_jsonl(tmp_path / "blanks.jsonl", [d for doc in DOCUMENTS for d in (doc, "  ")], "content")
    samples = load_calibration_samples(str(with_blanks), tokenizer, n_samples=4, seq_len=32, text_field="content")
    assert samples.shape == (4, 32)
    assert not (samples == tokenizer.eos_token_id).unfold(1, 2, 1).all(-1).any()  # no EOS EOS (empty document)
    assert not torch.equal(samples, load_calibration_samples(str(plain), tokenizer, n_samples=4, seq_len=32))


def test_uses_every_document_when_just_enough_text(tmp_path, tokenizer):
    source = _write_txt(tmp_path / "calib.txt", DOCUMENTS[:5])
    total = _stream_length(tokenizer, DOCUMENTS[:5])
    samples = load_calibration_samples(str(source), tokenizer, n_samples=total // 16, seq_len=16)
    assert samples.shape == (total // 16, 16)
    assert (samples == tokenizer.eos_token_id).sum() >= 4


def test_blocks_are_drawn_from_anywhere_in_a_long_document(tmp_path, tokenizer):
    book = " ".join(DOCUMENTS)  # one paragraph: one document
    source = _write_txt(tmp_path / "book.txt", [book])
    stream = tokenizer(book, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    blocks = torch.tensor(stream[: len(stream) // 16 * 16]).view(-1, 16)
    samples = load_calibration_samples(str(source), tokenizer, n_samples=4, seq_len=16)
    positions = [next(i for i, block in enumerate(blocks) if torch.equal(block, row)) for row in samples]
    assert len(set(positions)) == 4 and max(positions) >= 4  # not just the first four blocks


class _CountingTokenizer:
    """Passes calls to a tokenizer and counts the texts it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_id, self.texts_seen = tokenizer, tokenizer.eos_token_id, 0

    def __call__(self, texts, **kwargs):
        self.texts_seen += len(texts)
        return self.tokenizer(texts, **kwargs)


def test_stops_tokenizing_once_enough_tokens(tmp_path, tokenizer):
    source = _write_jsonl(tmp_path / "many.jsonl", DOCUMENTS * 5)
    counting = _CountingTokenizer(tokenizer)
    third = _stream_length(tokenizer, DOCUMENTS) * 5 // 3  # about 100 of the 300 documents
    samples = load_calibration_samples(str(source), counting, n_samples=third // 16, seq_len=16)
    assert samples.shape == (third // 16, 16)
    assert 100 < counting.texts_seen < len(DOCUMENTS) * 5


def test_too_little_text_says_how_many_tokens(tmp_path, tokenizer):
    source = _write_txt(tmp_path / "small.txt", DOCUMENTS[:3])
    found = _stream_length(tokenizer, DOCUMENTS[:3])
    with pytest.raises(LmcError) as error:
        load_calibration_samples(str(source), tokenizer, n_samples=128, seq_len=512)
    message = str(error.value)
    assert "\n" not in message
    assert f"gives {found} tokens" in message and "65536" in message
    assert "--calib-samples" in message and "more text" in message


@pytest.mark.parametrize(
    "name, make, fragments",
    [
        ("missing.txt", None, ["not found", "--calib-data"]),
        ("notes.md", lambda p: p.write_text("some text"), ["unsupported extension", "--calib-data", ".jsonl"]),
        ("other.jsonl", lambda p: _write_jsonl(p, DOCUMENTS, "body"), ["no 'text' field", "body", "--text-field"]),
        ("numbers.jsonl", lambda p: p.write_text('{"text": 3}\n'), ["not text", "--text-field"]),
        ("broken.jsonl", lambda p: p.write_text('{"text": "a"\n'), ["cannot read", "json"]),
        ("empty_dir", lambda p: p.mkdir(), ["holds no", "--calib-data"]),
    ],
)
def test_bad_sources_raise_one_line_errors(tmp_path, tokenizer, name, make, fragments):
    path = tmp_path / name
    if make:
        make(path)
    with pytest.raises(LmcError) as error:
        load_calibration_samples(str(path), tokenizer, n_samples=2, seq_len=8)
    message = str(error.value)
    assert "\n" not in message
    assert all(fragment in message for fragment in fragments), message


def test_directory_mixing_file_types_is_refused(tmp_path, tokenizer):
    _write_txt(tmp_path / "a.txt", DOCUMENTS)
    _write_jsonl(tmp_path / "b.jsonl", DOCUMENTS)
    with pytest.raises(LmcError, match="mixes file types"):
        load_calibration_samples(str(tmp_path), tokenizer)


def test_uncached_named_set_fails_fast_when_the_hub_is_unreachable(tokenizer):
    if _hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable here: the set would be downloaded")
    start = time.monotonic()
    with pytest.raises(LmcError) as error:
        load_calibration_samples("pileval", tokenizer)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert "calibration set 'pileval' is not cached" in message and "--calib-data PATH" in message


def test_offline_mode_fails_fast_for_eval_sets_too(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(LmcError, match=r"evaluation set 'wikitext2' is not cached.*--data PATH"):
        load_eval_text("wikitext2")
    assert time.monotonic() - start < 10


def _cache_named_set(cache: Path, repo: str, config: str, split: str, texts: list[str]) -> None:
    """Lay out `texts` the way `datasets` caches a downloaded Hub set (arrow stream + dataset_info.json)."""
    name = repo.split("/")[-1]
    target = cache / repo.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    target.mkdir(parents=True)
    table = datasets.Dataset.from_dict({"text": texts}).data.table
    with pa.OSFile(filenames_for_dataset_split(str(target), name, split, "arrow")[0], "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    splits = datasets.SplitDict({split: datasets.SplitInfo(split, num_examples=len(texts), dataset_name=name)})
    info = datasets.DatasetInfo(
        features=datasets.Features({"text": datasets.Value("string")}),
        config_name=config,
        dataset_name=name,
        splits=splits,
    )
    info.write_to_directory(str(target))


def test_cached_named_sets_load_without_the_hub(private_datasets_cache, tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _cache_named_set(private_datasets_cache, "mit-han-lab/pile-val-backup", "default", "validation", DOCUMENTS)
    rows = ["", " = Title = \n", "", " Some text . \n"]
    _cache_named_set(private_datasets_cache, "Salesforce/wikitext", "wikitext-2-raw-v1", "test", rows)

    local = _write_jsonl(tmp_path / "same.jsonl", DOCUMENTS)
    samples = load_calibration_samples("pileval", tokenizer, n_samples=5, seq_len=40)
    assert torch.equal(samples, load_calibration_samples(str(local), tokenizer, n_samples=5, seq_len=40))
    assert load_eval_text("wikitext2") == "\n\n".join(rows)


def test_eval_text_of_a_txt_file_is_its_text(tmp_path):
    text = "First paragraph,\nstill first.\n\nSecond paragraph."
    (tmp_path / "eval.txt").write_text(text)
    assert load_eval_text(str(tmp_path / "eval.txt")) == text
    _write_jsonl(tmp_path / "eval.jsonl", ["a b", "c"])
    assert load_eval_text(str(tmp_path / "eval.jsonl")) == "a b\n\nc"
