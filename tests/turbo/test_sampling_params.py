import dataclasses

import pytest

from lmcompress.errors import LmcError
from lmcompress.turbo.sampling_params import SamplingParams


def test_defaults_are_the_openai_completions_defaults():
    params = SamplingParams()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k, params.min_p) == (16, 1.0, 1.0, 0, 0.0)
    assert (params.repetition_penalty, params.seed, params.logprobs, params.n) == (1.0, None, None, 1)
    assert (params.stop, params.stop_token_ids, params.ignore_eos) == ((), (), False)
    assert params.skip_special_tokens and not params.include_stop_str_in_output
    assert not params.is_greedy


@pytest.mark.parametrize(
    ("field", "value", "range_text"),
    [
        ("temperature", -1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, "-1, 0 (off) or >= 1"),
        ("top_k", 2.5, "-1, 0 (off) or >= 1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", float("inf"), "> 0"),
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", True, ">= 1"),
        ("n", 0, ">= 1"),
        ("logprobs", -1, "[0, 20]"),
        ("logprobs", 21, "[0, 20]"),
        ("seed", 2**64, "[-2**63, 2**64 - 1]"),
        ("seed", "7", "[-2**63, 2**64 - 1]"),
        ("ignore_eos", 1, "True or False"),
        ("stop", [""], "non-empty strings"),
        ("stop", ["ok", 3], "non-empty strings"),
        ("stop", 3, "a list"),
        ("stop_token_ids", [-1], "integers >= 0"),
    ],
)
def test_invalid_value_names_field_range_and_value(field, value, range_text):
    with pytest.raises(LmcError) as raised:
        SamplingParams(**{field: value})
    message = str(raised.value)
    assert message.startswith(f"{field} must be")
    assert range_text in message
    assert "got" in message and ";" in message  # the value given, then the fix


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"temperature": 3.5},
        {"top_p": 1},
        {"top_p": 1e-9},
        {"top_k": -1},
        {"top_k": 1},
        {"min_p": 1.0},
        {"repetition_penalty": 0.5},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": 0},
        {"seed": -1},
        {"seed": 2**64 - 1},
        {"n": 4, "temperature": 0.7},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    assert all(getattr(SamplingParams(**kwargs), k) == v for k, v in kwargs.items())


def test_greedy_with_several_choices_is_rejected_with_the_fix():
    with pytest.raises(LmcError, match=r"^n must be 1 when temperature is 0.*set n=1 or a temperature > 0"):
        SamplingParams(n=2, temperature=0)


def test_stop_containers_become_tuples_so_params_hash():
    params = SamplingParams(stop="###", stop_token_ids=[7, 9])
    assert params.stop == ("###",) and params.stop_token_ids == (7, 9)
    assert SamplingParams(stop=None).stop == ()
    assert hash(params) == hash(SamplingParams(stop=["###"], stop_token_ids=(7, 9)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 5


def test_tiny_temperature_counts_as_greedy():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=1e-6).is_greedy
    assert not SamplingParams(temperature=1e-3).is_greedy


def test_choices_of_a_seeded_request_get_distinct_seeds():
    params = SamplingParams(n=3, seed=41, temperature=0.8)
    choices = [params.for_choice(i) for i in range(3)]
    assert [c.seed for c in choices] == [41, 42, 43]
    assert all(c.n == 1 and c.temperature == 0.8 for c in choices)
    assert SamplingParams(n=2, temperature=1.0).for_choice(1).seed is None
    # Wraps inside torch's seed range instead of failing validation.
    assert SamplingParams(n=2, seed=2**64 - 1).for_choice(1).seed == 0
