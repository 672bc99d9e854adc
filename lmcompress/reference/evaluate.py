"""How the reference model is measured: held-out perplexity, plain and after RTN fake-quantization.

Perplexity follows the AWQ/GPTQ WikiText-2 recipe: tokenize the whole text once
(so only the first window starts with <s>), cut it into non-overlapping windows of
`seq_len` tokens, drop the remainder, and take exp of the mean next-token loss.

The fake-quantizer here is deliberately self-contained (it is the acceptance
check run at the end of training, on a machine that has only this package): RTN,
asymmetric, per group of `group_size` input channels, as AutoAWQ computes it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase


def token_stream(tokenizer: PreTrainedTokenizerBase, docs: list[str], add_bos: bool = True) -> torch.Tensor:
    """[n] int64: the ids of "\\n\\n".join(docs), exactly as one tokenizer call would give them.

    Encoding "\\n\\n" + doc as separate texts (in parallel, in the Rust tokenizer)
    is identical to encoding the joined text, because each document ends in a
    non-space character, so the byte-level pre-tokenizer starts a new piece there anyway.
    """
    pieces = [docs[0]] + ["\n\n" + d for d in docs[1:]]
    encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
    head = [tokenizer.bos_token_id] if add_bos else []
    return torch.tensor(head + [t for ids in encoded for t in ids], dtype=torch.long)


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int = 8) -> float:
    """exp(mean NLL) over ids[: n * seq_len] cut into n windows; ids is [n_tokens] int64."""
    device = next(model.parameters()).device
    n_windows = ids.numel() // seq_len
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    nll_sum, n_predicted = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch).logits.float()  # [b, seq_len, vocab]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll_sum += nll.item()
        n_predicted += batch[:, 1:].numel()
    return math.exp(nll_sum / n_predicted)


def rtn_fake_quantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in]: round-to-nearest asymmetric group quantization, dequantized."""
    out_features, in_features = weight.shape
    w = weight.float().reshape(out_features, in_features // group_size, group_size)
    max_code = 2**bits - 1
    w_max = w.amax(dim=-1, keepdim=True)
    w_min = w.amin(dim=-1, keepdim=True)
    scale = (w_max - w_min).clamp(min=1e-5) / max_code
    zero = (-torch.round(w_min / scale)).clamp(0, max_code)
    q = (torch.round(w / scale) + zero).clamp(0, max_code)
    return ((q - zero) * scale).reshape(out_features, in_features).to(weight.dtype)


@torch.no_grad()
def fake_quantize_decoder_linears(model: nn.Module, bits: int, group_size: int) -> None:
    """In place: RTN every nn.Linear of the decoder layers (not the embeddings or lm_head)."""
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(rtn_fake_quantize(module.weight, bits, group_size))
