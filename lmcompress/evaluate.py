"""Perplexity of a causal LM over one long text, with fixed-length sliding windows.

The method of the Hugging Face guide "Perplexity of fixed-length models": windows
of `max_length` tokens start every `stride` tokens, and each window scores only
its new tokens (those no earlier window scored), each with all of the window's
earlier tokens as context. Every token but the first is thus scored exactly once
when stride < max_length, and every scored token sees at least
max_length - stride tokens of context. stride == max_length gives disjoint
windows whose first token has no context and goes unscored: the protocol behind
the GPTQ/AWQ papers' WikiText-2 numbers (with max_length 2048).

BOS: the text is tokenized once, whole, with the tokenizer's default special
tokens. A tokenizer that prepends BOS (Llama-2) puts one at the start of the
first window only; one that does not (Qwen2) adds none. Windows never get an
extra BOS.
"""

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmcompress.errors import LmcError

# Window length when the caller gives none, capped by the model's positions:
# the length of the published GPTQ/AWQ perplexities.
DEFAULT_MAX_LENGTH = 2048
# With batch_size None, batch as many windows as keep their fp32 logits under this.
_LOGITS_BUDGET_BYTES = 1 << 30
_IGNORE = -100


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(nll_mean)
    nll_mean: float  # mean negative log-likelihood of the scored tokens, in nats
    num_tokens: int  # tokens scored
    max_length: int  # window length
    stride: int  # distance between window starts

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) are fed to the model; tokens [first_scored, end) are scored."""

    begin: int
    end: int
    first_scored: int


def sliding_windows(num_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows that score each token of a `num_tokens` text once (token 0 never)."""
    windows = []
    scored_until = 1  # token 0 has no context
    for begin in range(0, num_tokens, stride):
        end = min(begin + max_length, num_tokens)
        first_scored = max(scored_until, begin + 1)
        if first_scored < end:
            windows.append(Window(begin, end, first_scored))
        scored_until = end
        if end == num_tokens:
            break
    return windows


def perplexity(
    model,
    tokenizer,
    text_or_ids: str | torch.Tensor,
    max_length: int | None = None,
    stride: int | None = None,
    device: torch.device | str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity of `model` (any transformers causal LM) on a text.

    text_or_ids: the text (tokenized with `tokenizer`), or its token ids as a
        LongTensor [N] or [1, N] (then `tokenizer` may be None).
    max_length: window length; default min(model's max_position_embeddings, 2048).
    stride: distance between window starts, 1..max_length; default max_length // 2.
        Pass stride=max_length for the papers' disjoint-window protocol.
    device: where the windows go; default the model's (first) device.
    batch_size: windows per forward pass; default as many as keep fp32 logits under 1 GiB.

    The model is put in eval mode. Each window is right-padded to the batch's
    longest one; padding sits after every scored token, so a causal model's
    scores do not see it.
    """
    ids = _token_ids(tokenizer, text_or_ids)
    max_length = _default_max_length(model) if max_length is None else max_length
    stride = max_length // 2 if stride is None else stride
    _check_window(model, max_length, stride)
    windows = sliding_windows(ids.numel(), max_length, stride)
    batch_size = batch_size or _windows_per_batch(model, max_length)
    device = torch.device(device) if device is not None else model.device
    model.eval()
    total_nll = 0.0
    with torch.inference_mode():
        for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
            inputs, labels = _window_batch(ids, windows[start : start + batch_size])
            total_nll += _summed_nll(model, inputs.to(device), labels)
    num_tokens = sum(window.end - window.first_scored for window in windows)
    nll_mean = total_nll / num_tokens
    # torch's exp gives inf instead of OverflowError for a broken model's huge NLL.
    ppl = torch.tensor(nll_mean, dtype=torch.float64).exp().item()
    return PerplexityResult(ppl=ppl, nll_mean=nll_mean, num_tokens=num_tokens, max_length=max_length, stride=stride)


def write_result_json(path: str | Path, result: PerplexityResult, extra: dict | None = None) -> None:
    """Write `extra` and the result's fields as one JSON object, atomically (temp file, then rename)."""
    extra = extra or {}
    clashes = set(extra) & set(asdict(result))
    if clashes:
        raise ValueError(f"extra keys {sorted(clashes)} would overwrite perplexity result fields")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump({**extra, **asdict(result)}, file, indent=2)
            file.write("\n")
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _token_ids(tokenizer, text_or_ids: str | torch.Tensor) -> torch.Tensor:
    """The text's token ids: LongTensor [N], N >= 2."""
    if isinstance(text_or_ids, str):
        ids = tokenizer(text_or_ids, return_tensors="pt", verbose=False)["input_ids"][0]
    elif text_or_ids.dim() == 2 and text_or_ids.shape[0] == 1:
        ids = text_or_ids[0]
    elif text_or_ids.dim() == 1:
        ids = text_or_ids
    else:
        raise ValueError(f"token ids must be [N] or [1, N], got shape {list(text_or_ids.shape)}")
    if ids.numel() < 2:
        raise LmcError(
            f"the evaluation text has {ids.numel()} token(s) and perplexity needs at least 2; pass a longer text"
        )
    return ids.long().cpu()


def _default_max_length(model) -> int:
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(positions, DEFAULT_MAX_LENGTH) if positions else DEFAULT_MAX_LENGTH


def _check_window(model, max_length: int, stride: int) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if max_length < 2:
        raise LmcError(f"perplexity window of {max_length} tokens is too short; pass --max-length 2 or more")
    if positions and max_length > positions:
        raise LmcError(
            f"perplexity window of {max_length} tokens exceeds the model's {positions} positions; "
            f"pass --max-length {positions} or less"
        )
    if not 1 <= stride <= max_length:
        raise LmcError(
            f"perplexity stride {stride} must be between 1 and the window length {max_length} "
            "(a larger stride would skip tokens); pass a smaller --stride"
        )


def _windows_per_batch(model, max_length: int) -> int:
    vocab_size = model.get_output_embeddings().weight.shape[0]
    return max(1, _LOGITS_BUDGET_BYTES // (max_length * vocab_size * 4))


def _window_batch(ids: torch.Tensor, windows: Sequence[Window]) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [B, T] right-padded with token 0, and labels [B, T]: the scored tokens, else -100."""
    length = max(window.end - window.begin for window in windows)
    inputs = torch.zeros(len(windows), length, dtype=torch.long)
    labels = torch.full((len(windows), length), _IGNORE, dtype=torch.long)
    for row, window in enumerate(windows):
        inputs[row, : window.end - window.begin] = ids[window.begin : window.end]
        labels[row, window.first_scored - window.begin : window.end - window.begin] = ids[
            window.first_scored : window.end
        ]
    return inputs, labels


def _summed_nll(model, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over the labelled tokens of -log p(token | earlier tokens of its window)."""
    logits = model(input_ids=inputs, use_cache=False).logits  # [B, T, V]
    targets = labels[:, 1:].to(logits.device)  # logits at position p predict token p + 1
    scored = targets != _IGNORE  # [B, T-1]
    # Upcast only the scored rows, [n_scored, V], to fp32 (or keep fp64).
    scored_logits = logits[:, :-1][scored]
    scored_logits = scored_logits.to(torch.promote_types(scored_logits.dtype, torch.float32))
    return F.cross_entropy(scored_logits, targets[scored], reduction="sum").item()


def evaluate_checkpoint(model_dir: str | Path, data: str, device: str = "auto", max_length: int | None = None,
                        stride: int | None = None, max_tokens: int | None = None,
                        json_path: str | Path | None = None) -> PerplexityResult:
    """Perplexity of a float or quantized checkpoint directory on a text source (`lmc eval ppl`).

    Quantized checkpoints run through the loader's dequantizing reference path.
    """
    import transformers
    from transformers import AutoTokenizer

    from lmcompress.calib.data import load_eval_text
    from lmcompress.formats.loader import load_dequantized_model
    from lmcompress.resources import resolve_device

    torch_device = resolve_device(device)
    model = load_dequantized_model(model_dir, device=torch_device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = _token_ids(tokenizer, load_eval_text(data))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    result = perplexity(model, tokenizer, ids, max_length=max_length, stride=stride, device=torch_device)
    if json_path is not None:
        write_result_json(json_path, result, extra={
            "model": str(model_dir), "data": str(data), "device": str(torch_device), "max_tokens": max_tokens,
            "torch": torch.__version__, "transformers": transformers.__version__,
        })
    return result
