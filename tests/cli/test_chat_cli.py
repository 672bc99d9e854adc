"""`lmc generate` and `lmc chat` print what the engine generates offline for the same prompt,
with the chat template and the conversation history; /reset forgets; long histories are trimmed."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lmcompress.cli.main import cli
from lmcompress.reference import REFERENCE_MODEL_DIR
from lmcompress.turbo.engine import load_tokenizer
from lmcompress.turbo.llm import LLM
from lmcompress.turbo.sampling_params import SamplingParams

ENGINE = ["--device", "cpu", "--block-size", "16", "--num-kv-blocks", "64"]
GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def offline():
    return LLM(REFERENCE_MODEL_DIR, device="cpu", block_size=16, num_kv_blocks=64)


def _chat_ids(messages: list[dict]) -> list[int]:
    tokenizer = load_tokenizer(REFERENCE_MODEL_DIR)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _replies(output: str) -> list[str]:
    """The assistant's replies: what follows each 'assistant> ' up to the next prompt."""
    return [part.split("\nyou> ")[0] for part in output.split("assistant> ")[1:]]


def test_generate_prints_the_greedy_completion(offline):
    outcome = CliRunner().invoke(cli, ["generate", str(REFERENCE_MODEL_DIR), "The king said", "--max-tokens", "8",
                                       *ENGINE])
    assert outcome.exit_code == 0, outcome.output
    (expected,) = offline.generate(["The king said"], GREEDY)
    assert outcome.output == expected.outputs[0].text + "\n"


def test_chat_keeps_history_and_reset_forgets_it(offline):
    turns = ["Who is the king?", "And the queen?", "/reset", "Hello", "/exit"]
    outcome = CliRunner().invoke(cli, ["chat", str(REFERENCE_MODEL_DIR), "--temperature", "0", "--max-tokens", "8",
                                       *ENGINE], input="\n".join(turns) + "\n")
    assert outcome.exit_code == 0, outcome.output
    first, second, third = _replies(outcome.output)
    history = [{"role": "user", "content": turns[0]}]
    assert first == offline.generate([_chat_ids(history)], GREEDY)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": turns[1]}]
    assert second == offline.generate([_chat_ids(history)], GREEDY)[0].outputs[0].text
    fresh = [{"role": "user", "content": turns[3]}]
    assert third == offline.generate([_chat_ids(fresh)], GREEDY)[0].outputs[0].text


def test_chat_drops_the_oldest_turns_to_fit_the_context():
    long_turn = "tell me of the kings of the land of Egypt and of all their horses"
    outcome = CliRunner().invoke(cli, ["chat", str(REFERENCE_MODEL_DIR), "--max-tokens", "8", "--max-model-len", "64",
                                       *ENGINE], input=f"{long_turn}\n{long_turn}\n{long_turn}\n")
    assert outcome.exit_code == 0, outcome.output
    assert "dropped the oldest turn" in outcome.output
    assert len(_replies(outcome.output)) == 3
