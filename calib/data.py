"""Calibration token blocks and evaluation text, from local files or cached Hub sets.

Sources are read with `datasets.load_dataset`: a local file or directory
(.txt: documents separated by blank lines; .jsonl/.json/.csv/.parquet: one
document per row in a text field), or a named set on the Hugging Face Hub
(see CALIBRATION_SETS / EVAL_SETS). A named set is read from the local
`datasets` cache first and downloaded only when the Hub answers, so an offline
machine gets an immediate error naming the local-file option instead of
minutes of retries.
"""

import contextlib
import itertools
import socket
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import datasets
import huggingface_hub
import torch

from lmcompress.errors import LmcError

# `datasets` builder for each local file type.
LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_LOCAL_TYPES = "/".join(LOCAL_BUILDERS)

# Documents tokenized per tokenizer call (fast tokenizers parallelize over a batch).
_TOKENIZE_BATCH = 64
# Seconds to wait for a TCP connection to the Hub (or proxy) before calling it unreachable.
_HUB_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class HubTextSet:
    """A text set on the Hugging Face Hub: arguments of `datasets.load_dataset`."""

    repo: str
    config: str | None
    split: str
    data_files: dict[str, str] | None = None


CALIBRATION_SETS = {
    # AutoAWQ's default calibration set.
    "pileval": HubTextSet("mit-han-lab/pile-val-backup", None, "validation"),
    "wikitext2": HubTextSet("Salesforce/wikitext", "wikitext-2-raw-v1", "train"),
    # One of the eight validation shards, as GPTQ and LMDeploy take it.
    "c4": HubTextSet("allenai/c4", None, "validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}),
}
EVAL_SETS = {"wikitext2": HubTextSet("Salesforce/wikitext", "wikitext-2-raw-v1", "test")}


@dataclass(frozen=True)
class _SourceKind:
    """What a source is for: names the sets it may be and the CLI option that gives a path instead."""

    purpose: str
    named_sets: dict[str, HubTextSet]
    path_option: str


_CALIBRATION = _SourceKind("calibration", CALIBRATION_SETS, "--calib-data")
_EVALUATION = _SourceKind("evaluation", EVAL_SETS, "--data")


def load_calibration_samples(
    source: str,
    tokenizer,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 42,
    text_field: str = "text",
) -> torch.Tensor:
    """Return `n_samples` blocks of `seq_len` token ids: LongTensor [n_samples, seq_len].

    Documents are visited in a seeded random order; each non-empty one is tokenized
    without special tokens and followed by EOS (when the tokenizer has one). Visiting
    stops once the stream holds n_samples * seq_len tokens, so a large named set costs
    only what is needed. The stream is cut into whole seq_len blocks and n_samples of
    them are drawn with the same seeded generator: the result depends only on the
    documents, the tokenizer and the arguments.
    """
    if n_samples < 1 or seq_len < 1:
        raise LmcError(
            f"calibration needs at least one sample of at least one token, got {n_samples} x {seq_len}; "
            "pass positive --calib-samples and --calib-seqlen"
        )
    documents = _load_documents(source, text_field, _CALIBRATION)
    needed = n_samples * seq_len
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(documents), generator=generator).tolist()
    stream = _token_stream(_texts_in_order(documents, text_field, order), tokenizer, needed)
    if stream.numel() < needed:
        raise LmcError(
            f"calibration data {source} gives {stream.numel()} tokens but {n_samples} samples x {seq_len} tokens "
            f"= {needed} are needed; lower --calib-samples/--calib-seqlen or give more text"
        )
    blocks = stream[: stream.numel() // seq_len * seq_len].view(-1, seq_len)  # [n_blocks, seq_len]
    chosen = torch.randperm(blocks.shape[0], generator=generator)[:n_samples]
    return blocks[chosen]


def load_eval_text(source: str, text_field: str = "text") -> str:
    """Return the evaluation text of `source`: its documents joined by blank lines.

    For "wikitext2" (the test split) this is the usual `"\\n\\n".join(test["text"])`
    behind published WikiText-2 perplexities; for a .txt file it is the file's text.
    """
    documents = _load_documents(source, text_field, _EVALUATION)
    return "\n\n".join(documents[text_field])


def _load_documents(source: str, text_field: str, kind: _SourceKind) -> datasets.Dataset:
    """Load `source` (a local path first, else a named set) and check its text field."""
    if Path(source).exists():
        documents = _load_local(Path(source), kind)
    elif source in kind.named_sets:
        documents = _load_hub_set(source, kind)
    else:
        raise LmcError(
            f"{kind.purpose} data {source} not found (no such file or directory, and not one of the sets "
            f"{', '.join(kind.named_sets)}); pass {kind.path_option} PATH to an existing {_LOCAL_TYPES} file "
            "or directory"
        )
    _check_text_field(documents, text_field, source)
    return documents


def _load_local(path: Path, kind: _SourceKind) -> datasets.Dataset:
    builder, files = _local_files(path, kind)
    # A .txt file holds one document per blank-line-separated paragraph.
    options = {"sample_by": "paragraph"} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except datasets.exceptions.DatasetGenerationError as error:
        reason = str(error.__cause__ or error).splitlines()[0]
        raise LmcError(f"cannot read {path} as {builder} ({reason}); fix the file or pass another one") from None


def _local_files(path: Path, kind: _SourceKind) -> tuple[str, list[Path]]:
    """The `datasets` builder for `path` and the files it reads (all files of one type)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_BUILDERS)
        if not files:
            raise LmcError(
                f"directory {path} holds no {_LOCAL_TYPES} files; pass {kind.path_option} PATH to such a file"
            )
    else:
        files = [path]
    builders = {LOCAL_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders:
        raise LmcError(f"{path} has an unsupported extension; pass {kind.path_option} PATH to a {_LOCAL_TYPES} file")
    if len(builders) > 1:
        raise LmcError(
            f"directory {path} mixes file types ({', '.join(sorted(builders))}); keep files of one type in it"
        )
    return builders.pop(), files


def _load_hub_set(name: str, kind: _SourceKind) -> datasets.Dataset:
    hub_set = kind.named_sets[name]
    arguments = dict(path=hub_set.repo, name=hub_set.config, split=hub_set.split, data_files=hub_set.data_files)
    try:
        with _hub_offline():
            return datasets.load_dataset(**arguments)
    except ConnectionError:  # not in the local cache
        if not _hub_reachable():
            raise LmcError(
                f"{kind.purpose} set '{name}' is not cached and the Hugging Face Hub is unreachable; "
                f"pass {kind.path_option} PATH to a local {_LOCAL_TYPES} file"
            ) from None
    return datasets.load_dataset(**arguments)


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make `datasets` and `huggingface_hub` read only their caches.

    Both read HF_HUB_OFFLINE / HF_DATASETS_OFFLINE once, at import, into these
    module attributes, which they consult on every call.
    """
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _hub_reachable() -> bool:
    """Whether a TCP connection to the Hub endpoint (or the configured proxy) opens quickly."""
    if datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(datasets.config.HF_ENDPOINT)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    first_hop = urlparse(proxy) if proxy else endpoint
    default_port = 443 if first_hop.scheme == "https" else 80
    try:
        socket.create_connection((first_hop.hostname, first_hop.port or default_port), _HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _check_text_field(documents: datasets.Dataset, text_field: str, source: str) -> None:
    feature = documents.features.get(text_field)
    if feature is None:
        raise LmcError(
            f"{source} has no '{text_field}' field (fields: {', '.join(documents.column_names)}); "
            "pass --text-field NAME naming the field that holds the text"
        )
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise LmcError(
            f"field '{text_field}' of {source} holds {feature}, not text; pass --text-field NAME naming a text field"
        )


def _texts_in_order(documents: datasets.Dataset, text_field: str, order: list[int]) -> Iterator[list[str]]:
    """Batches of stripped, non-empty texts of `documents`, visited in `order`."""
    for start in range(0, len(order), _TOKENIZE_BATCH):
        texts = ((text or "").strip() for text in documents[order[start : start + _TOKENIZE_BATCH]][text_field])
        yield [text for text in texts if text]


def _token_stream(text_batches: Iterator[list[str]], tokenizer, budget: int) -> torch.Tensor:
    """Token ids of the texts, each followed by EOS, until `budget` ids: LongTensor [n >= budget or all]."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    pieces: list[list[int]] = []
    total = 0
    for texts in text_batches:
        if not texts:
            continue
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            pieces.append(ids + eos)
            total += len(ids) + len(eos)
        if total >= budget:
            break
    return torch.tensor(list(itertools.chain.from_iterable(pieces)), dtype=torch.long)
