"""Batched next-token sampling on the logits' device (CPU or CUDA).

One step, for logits [batch, vocab], in the order of HF generate() and vLLM:
repetition penalty, temperature, top-k, top-p, min-p, then one draw per row.
Each stage is a batched tensor op over all rows with per-row parameters; a stage
no row uses is skipped.  Greedy rows (temperature 0) take the exact argmax of the
penalised logits.

The draw is an exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) is a
sample from p (the Gumbel-max trick in another form).  Unseeded rows draw their
E from the sampler's shared generator in one call; each seeded row then redraws
its own row of E from its request's generator, so a seeded request's tokens
depend only on its seed and its own logits, never on the rest of the batch.

Logprobs are vLLM's default "raw" logprobs: log_softmax of the model's logits
as given, before penalties, temperature and filtering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmcompress.turbo.sampling_params import SamplingParams
from lmcompress.turbo.transfer import to_device


@dataclass(frozen=True)
class SamplingRow:
    """The request state behind one row of logits.

    prompt_token_ids / output_token_ids: read only when repetition_penalty != 1
        (the penalty applies to every token already in prompt or output).
    generator: the request's own stream, required when params.seed is set and the
        row is not greedy; create it once per request with Sampler.request_generator
        and pass the same object every step.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class TokenLogprobs:
    """Raw logprobs of one step: the sampled token's, and the params.logprobs most likely tokens'."""

    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [batch] int64, on the logits' device
    logprobs: list[TokenLogprobs | None]  # per row; None where params.logprobs is None


def seen_token_mask(histories: Sequence[torch.Tensor], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] bool: True where the token id occurs in that row's 1-D int64 history."""
    lengths = torch.tensor([h.numel() for h in histories], device=device)
    rows = torch.repeat_interleave(torch.arange(len(histories), device=device), lengths)
    seen = torch.zeros(len(histories), vocab_size, dtype=torch.bool, device=device)
    seen[rows, torch.cat(list(histories)).to(device)] = True
    return seen


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF/vLLM penalty on logits [rows, vocab]: seen tokens' logits go to l / p if l >= 0 else l * p.

    seen [rows, vocab] bool; penalty [rows].  Dividing a positive logit and
    multiplying a negative one both make the token less likely for p > 1.
    """
    p = penalty.unsqueeze(1)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask to -inf the tokens outside each row's top-k, then outside its top-p nucleus.

    logits [batch, vocab]; top_k [batch] int64 in [1, vocab] (vocab = off);
    top_p [batch] float in (0, 1] (1 = off).  Like HF's warpers: ties with the
    k-th logit are kept, and the nucleus is taken over the top-k renormalised
    distribution and always keeps the most likely token.
    """
    # One ascending sort serves both filters: kept tokens sit at the right end.
    sorted_logits, order = logits.sort(dim=-1)
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (logits.shape[1] - top_k).unsqueeze(1))  # [batch, 1]
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        outside = cumulative <= (1 - top_p).unsqueeze(1)
        outside[:, -1] = False
        sorted_logits.masked_fill_(outside, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below min_p [batch] times their row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def warp_logits(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on logits [batch, vocab], with params[i] for row i.

    Greedy rows pass through with temperature 1 (dividing by 0 would make NaNs);
    their token is the argmax, which no later stage changes.
    """
    vocab = logits.shape[1]
    if any(not p.is_greedy and p.temperature != 1.0 for p in params):
        temperature = _per_row([1.0 if p.is_greedy else p.temperature for p in params], torch.float32, logits)
        logits = logits / temperature.unsqueeze(1)
    top_k = top_p = None
    if any(0 < p.top_k < vocab for p in params):
        top_k = _per_row([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.int64, logits)
    if any(p.top_p < 1.0 for p in params):
        top_p = _per_row([p.top_p for p in params], torch.float32, logits)
    if top_k is not None or top_p is not None:
        logits = apply_top_k_top_p(logits, top_k, top_p)
    if any(p.min_p > 0.0 for p in params):
        logits = apply_min_p(logits, _per_row([p.min_p for p in params], torch.float32, logits))
    return logits


class Sampler:
    """Samples one token per row; owns the shared generator of the unseeded rows.

    device: where logits arrive, and where every generator must live.
    seed: seeds the shared generator, for runs reproducible as a whole (benchmarks);
        None seeds it from the OS.
    """

    def __init__(self, device: torch.device | str = "cpu", seed: int | None = None) -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def request_generator(self, seed: int) -> torch.Generator:
        """The generator a seeded request keeps for its whole life (SamplingRow.generator)."""
        return torch.Generator(device=self.device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits [batch, vocab] (any float dtype, left unchanged); rows: one per logits row."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} must be [batch, vocab] with batch = {len(rows)} rows")
        # float() copies only other dtypes; no stage below writes into the caller's logits.
        processed = _penalise(logits.float(), rows)
        token_ids = processed.argmax(dim=-1)
        greedy = [row.params.is_greedy for row in rows]
        if not all(greedy):
            probs = warp_logits(processed, [row.params for row in rows]).softmax(dim=-1)
            token_ids = torch.where(_per_row(greedy, torch.bool, logits), token_ids, self._draw(probs, rows))
        return SamplerOutput(token_ids=token_ids, logprobs=_raw_logprobs(logits, token_ids, rows))

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """One token per row of probs [batch, vocab] by exponential race."""
        race = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, row in enumerate(rows):
            if row.params.seed is None or row.params.is_greedy:
                continue
            if row.generator is None:
                raise ValueError(
                    f"row {i} has seed {row.params.seed} but no generator; "
                    f"pass Sampler.request_generator(seed) in its SamplingRow"
                )
            race[i].exponential_(generator=row.generator)
        # A zero draw would turn a masked token's 0 / 0 into NaN, which argmax picks.
        race.clamp_(min=torch.finfo(race.dtype).tiny)
        return (probs / race).argmax(dim=-1)


def _per_row(values: list, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A [batch] tensor of per-row parameters on `like`'s device."""
    return to_device(values, like.device, dtype)


def _penalise(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition penalty on the rows that ask for one, into a copy of logits [batch, vocab] float32."""
    penalised = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not penalised:
        return logits
    index = _per_row(penalised, torch.int64, logits)
    seen = seen_token_mask([_history(rows[i]) for i in penalised], logits.shape[1], logits.device)
    penalty = _per_row([rows[i].params.repetition_penalty for i in penalised], torch.float32, logits)
    return logits.index_copy(0, index, apply_repetition_penalty(logits[index], seen, penalty))


def _history(row: SamplingRow) -> torch.Tensor:
    """Prompt + output ids as one 1-D int64 tensor (torch converts the sequences in C)."""
    parts = (row.prompt_token_ids, row.output_token_ids)
    return torch.cat([torch.as_tensor(part, dtype=torch.int64) for part in parts])


def _raw_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, rows: Sequence[SamplingRow]
) -> list[TokenLogprobs | None]:
    """Raw logprobs for the rows that ask, copied to the host in one transfer per tensor."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(rows)
    if not wanted:
        return result
    index = _per_row(wanted, torch.int64, logits)
    logprobs = torch.log_softmax(logits[index].float(), dim=-1)  # [wanted, vocab]
    sampled = logprobs.gather(1, token_ids[index].unsqueeze(1)).squeeze(1).tolist()
    num_top = min(max(rows[i].params.logprobs for i in wanted), logprobs.shape[1])
    top_logprobs, top_ids = (t.tolist() for t in logprobs.topk(num_top, dim=-1))
    for j, i in enumerate(wanted):
        n = rows[i].params.logprobs
        result[i] = TokenLogprobs(logprob=sampled[j], top=tuple(zip(top_ids[j][:n], top_logprobs[j][:n])))
    return result
