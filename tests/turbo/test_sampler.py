import pytest
import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lmcompress.turbo.sampler import (
    Sampler,
    SamplingRow,
    apply_repetition_penalty,
    seen_token_mask,
    warp_logits,
)
from lmcompress.turbo.sampling_params import SamplingParams

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]
# Upper 0.1% point of the chi-square distribution with 5 degrees of freedom.
CHI2_5DOF_999 = 20.52


def random_logits(batch: int, vocab: int, seed: int, scale: float = 3.0, device: str = "cpu") -> torch.Tensor:
    return (torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale).to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_are_the_exact_argmax(device):
    logits = random_logits(6, 1000, seed=0, device=device)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, top_k=3),
        SamplingParams(temperature=0, top_p=0.2, min_p=0.5),
        SamplingParams(temperature=0, seed=5),  # greedy rows need no generator
        SamplingParams(temperature=1e-7),
        SamplingParams(temperature=0, logprobs=2),
    ]
    out = Sampler(device)(logits, [SamplingRow(p) for p in params])
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_k=1, temperature=1.8),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0, temperature=1.5),
    ],
    ids=["top_k=1", "top_k=1 hot", "top_p tiny", "min_p=1"],
)
def test_filters_that_keep_one_token_equal_greedy(params):
    logits = random_logits(32, 500, seed=1, scale=0.5)  # flat rows: a broken filter would show
    for seed in range(3):
        out = Sampler(seed=seed)(logits, [SamplingRow(params)] * 32)
        assert torch.equal(out.token_ids, logits.argmax(dim=-1))


def transformers_warpers(params: SamplingParams) -> LogitsProcessorList:
    """HF generate()'s warpers for params, in its order: temperature, top-k, top-p, min-p."""
    warpers = LogitsProcessorList()
    if params.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0.0:
        warpers.append(MinPLogitsWarper(params.min_p))
    return warpers


def test_warp_logits_matches_transformers_warpers_row_by_row():
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=20),
        SamplingParams(top_p=0.8),
        SamplingParams(temperature=1.3, top_k=50, top_p=0.9),
        SamplingParams(min_p=0.1),
        SamplingParams(temperature=0.5, top_k=40, top_p=0.95, min_p=0.05),
        SamplingParams(temperature=2.0, top_p=0.5, min_p=0.2),
        SamplingParams(top_k=-1, top_p=0.3),
    ]
    logits = random_logits(len(params), 256, seed=2)
    ours = warp_logits(logits, params)
    for row, p in enumerate(params):
        expected = transformers_warpers(p)(None, logits[row : row + 1].clone())[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), f"row {row} keeps other tokens"
        kept = ~torch.isinf(expected)
        assert 0 < kept.sum() < 256 or row == 0
        torch.testing.assert_close(ours[row][kept], expected[kept], rtol=0, atol=1e-6)


def test_repetition_penalty_matches_transformers():
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 50, (4, 30), generator=generator)  # repeats ids, as real histories do
    scores = torch.randn(4, 50, generator=generator) * 4
    penalties = [1.3, 0.7, 2.0, 1.05]
    seen = seen_token_mask(list(input_ids), 50, torch.device("cpu"))
    ours = apply_repetition_penalty(scores, seen, torch.tensor(penalties))
    for row, penalty in enumerate(penalties):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(input_ids[row : row + 1], scores[row : row + 1].clone())
        assert torch.equal(ours[row], expected[0])


def test_sampler_penalises_prompt_and_output_tokens():
    logits = torch.tensor([[5.0, 4.5, 3.0, -1.0, 2.9]])
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    out = Sampler()(logits, [SamplingRow(params, prompt_token_ids=(0,), output_token_ids=[1, 3])])
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1, 3]]), logits.clone())
    assert out.token_ids.item() == expected.argmax().item() == 2
    unpenalised = Sampler()(logits, [SamplingRow(SamplingParams(temperature=0), (0,), [1, 3])])
    assert unpenalised.token_ids.item() == 0


def chi_square(token_ids: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(token_ids, minlength=len(probs)).double()
    expected = probs.double() * len(token_ids)
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token the distribution excludes"
    return (((counts - expected)[support] ** 2) / expected[support]).sum().item()


PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (SamplingParams(), PROBS),
        (SamplingParams(temperature=0.5, top_k=3), PROBS[:3] ** 2 / (PROBS[:3] ** 2).sum()),
        # Nucleus 0.7 over ascending cumulative mass: drops 0.04, 0.06, 0.1 (their sum 0.2 <= 0.3).
        (SamplingParams(top_p=0.7), torch.cat([PROBS[:3] / 0.8, torch.zeros(3)])),
        # min_p 0.3: threshold 0.12 drops 0.1, 0.06, 0.04.
        (SamplingParams(min_p=0.3), torch.cat([PROBS[:3] / 0.8, torch.zeros(3)])),
    ],
    ids=["plain", "temperature+top_k", "top_p", "min_p"],
)
def test_unseeded_samples_follow_the_distribution(params, expected):
    expected = torch.cat([expected, torch.zeros(len(PROBS) - len(expected))])
    logits = PROBS.log().expand(20_000, -1)
    out = Sampler(seed=0)(logits, [SamplingRow(params)] * 20_000)
    assert chi_square(out.token_ids, expected) < CHI2_5DOF_999


def test_seeded_samples_follow_the_distribution():
    sampler = Sampler(seed=0)
    rows = [SamplingRow(SamplingParams(seed=s), generator=sampler.request_generator(s)) for s in range(5_000)]
    out = sampler(PROBS.log().expand(5_000, -1), rows)
    assert chi_square(out.token_ids, PROBS) < CHI2_5DOF_999


def run_seeded(device: str, seed: int, steps: list[torch.Tensor], batched: bool) -> list[int]:
    """Tokens of one seeded request over `steps` logits rows, alone or amid changing other rows."""
    sampler = Sampler(device, seed=123 if batched else 7)
    params = SamplingParams(seed=seed, temperature=0.9, top_k=100, top_p=0.95, repetition_penalty=1.1)
    generator = sampler.request_generator(seed)
    other_generator = sampler.request_generator(seed + 1)
    tokens: list[int] = []
    for step, logits in enumerate(steps):
        ours = SamplingRow(params, prompt_token_ids=(1, 2, 3), output_token_ids=tokens, generator=generator)
        if not batched:
            tokens.append(sampler(logits.unsqueeze(0), [ours]).token_ids.item())
            continue
        others = [
            SamplingRow(SamplingParams(temperature=1.2)),
            SamplingRow(SamplingParams(seed=seed + 1, top_p=0.5), generator=other_generator),
            SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.3), (4, 5)),
        ][: step % 4]
        position = step % (len(others) + 1)
        rows = others[:position] + [ours] + others[position:]
        batch = random_logits(len(rows), logits.shape[0], seed=1000 + step, device=device)
        batch[position] = logits
        tokens.append(sampler(batch, rows).token_ids[position].item())
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_tokens_do_not_depend_on_the_batch(device):
    steps = list(random_logits(25, 300, seed=4, scale=1.0, device=device))
    alone = run_seeded(device, 1234, steps, batched=False)
    assert run_seeded(device, 1234, steps, batched=True) == alone
    assert run_seeded(device, 1234, steps, batched=False) == alone
    assert len(set(alone)) > 10, "flat logits should give varied tokens"
    assert run_seeded(device, 1235, steps, batched=False) != alone


def test_logprobs_are_the_raw_log_softmax_of_the_logits():
    logits = random_logits(3, 100, seed=5)
    original = logits.clone()
    rows = [
        SamplingRow(SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, logprobs=4), (3, 7)),
        SamplingRow(SamplingParams(temperature=0, logprobs=0)),
        SamplingRow(SamplingParams()),
    ]
    out = Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, original), "the caller's logits must stay untouched"
    raw = torch.log_softmax(original, dim=-1)
    for row in (0, 1):
        token = out.token_ids[row].item()
        assert out.logprobs[row].logprob == pytest.approx(raw[row, token].item(), abs=1e-6)
    top_values, top_ids = raw[0].topk(4)
    assert [t for t, _ in out.logprobs[0].top] == top_ids.tolist()
    assert [lp for _, lp in out.logprobs[0].top] == pytest.approx(top_values.tolist(), abs=1e-6)
    assert out.logprobs[1].top == ()
    assert out.logprobs[2] is None


@pytest.mark.parametrize(
    "params",
    [SamplingParams(min_p=0.05), SamplingParams(top_k=20), SamplingParams(top_p=0.9), SamplingParams(temperature=0.7),
     SamplingParams(temperature=1.5, repetition_penalty=1.4)],
    ids=["min_p", "top_k", "top_p", "temperature", "penalty"],
)
def test_float32_logits_are_not_copied_up_front_yet_left_untouched(params):
    """Each stage in turn is the first to see the caller's float32 logits; none may write into them."""
    logits = random_logits(3, 200, seed=6)
    original = logits.clone()
    rows = [SamplingRow(params, (1, 2, 3)), SamplingRow(SamplingParams(temperature=0)),
            SamplingRow(SamplingParams(logprobs=2))]
    Sampler(seed=0)(logits, rows)
    assert torch.equal(logits, original)


def test_seeded_row_without_generator_is_a_caller_bug():
    with pytest.raises(ValueError, match="no generator"):
        Sampler()(torch.zeros(1, 10), [SamplingRow(SamplingParams(seed=3))])


def test_logits_must_have_one_row_per_request():
    with pytest.raises(ValueError, match=r"batch = 2 rows"):
        Sampler()(torch.zeros(3, 10), [SamplingRow(SamplingParams())] * 2)
