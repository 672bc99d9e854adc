"""Multiple-choice tasks: the file schema and its errors, acc/acc_norm arithmetic, and the built-in task."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from lmcompress.cli.main import cli
from lmcompress.errors import LmcError
from lmcompress.report.tasks import (
    BUILTIN, NUM_CHOICES, Task, TaskItem, build_heldout_items, builtin_task_path, load_task, score_task, write_task,
)


def test_the_committed_builtin_task_is_what_the_builder_makes(tmp_path, reference_paths):
    _, heldout, _ = reference_paths
    rebuilt = tmp_path / "rebuilt.jsonl"
    write_task(rebuilt, build_heldout_items(heldout.read_text(encoding="utf-8")))
    assert rebuilt.read_bytes() == builtin_task_path().read_bytes()


def test_builtin_items_pick_the_true_half_sentence_among_four(reference_paths):
    _, heldout, _ = reference_paths
    text = " ".join(heldout.read_text(encoding="utf-8").split())
    task = load_task(BUILTIN)
    assert len(task.items) == 500
    for item in task.items:
        assert len(item.choices) == NUM_CHOICES == len(set(item.choices))
        assert f"{item.context}{item.choices[item.gold]}" in text
    # The answer's position is shuffled: no index is a safe guess.
    counts = Counter(item.gold for item in task.items)
    assert min(counts.values()) > 80 and set(counts) == set(range(NUM_CHOICES))


@pytest.mark.parametrize("line, problem", [
    ('{"context": "a", "choices": ["b", "c"], "gold": 0', "not valid JSON"),
    ('["a", "b"]', "expected an object"),
    ('{"context": 3, "choices": ["b", "c"], "gold": 0}', "'context' must be a string"),
    ('{"context": "a", "choices": ["b"], "gold": 0}', "two or more non-empty strings"),
    ('{"context": "a", "choices": "bc", "gold": 0}', "two or more non-empty strings"),
    ('{"context": "a", "choices": ["b", "c"], "gold": 2}', "'gold' must be an integer index"),
    ('{"context": "a", "choices": ["b", "c"], "gold": true}', "'gold' must be an integer index"),
])
def test_a_malformed_line_is_named_in_a_one_line_error(tmp_path, line, problem):
    path = tmp_path / "task.jsonl"
    good = '{"context": "a", "choices": [" b", " c"], "gold": 1}'
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(LmcError) as error:
        load_task(str(path))
    message = str(error.value)
    assert message.startswith(f"{path} line 3: ") and problem in message and "\n" not in message
    assert '"choices": [str, ...]' in message  # says what a good line looks like


def test_missing_and_empty_task_files_are_refused(tmp_path):
    with pytest.raises(LmcError, match="not found"):
        load_task(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(LmcError, match="has no items"):
        load_task(str(tmp_path / "empty.jsonl"))


def test_user_task_file_is_named_after_its_stem_and_keeps_extra_keys_out(tmp_path):
    path = tmp_path / "my-cloze.jsonl"
    path.write_text(json.dumps({"id": 7, "context": "x", "choices": [" y", " z"], "gold": 1}) + "\n")
    task = load_task(str(path))
    assert task.name == "my-cloze" and task.items == (TaskItem("x", (" y", " z"), 1),)


class _Tokenizer:
    """Characters as token ids, BOS (id 0) in front of the context only, as a Llama tokenizer puts it."""

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def test_acc_takes_the_highest_sum_and_acc_norm_the_highest_per_character_score():
    items = (
        TaskItem("q", (" a", " bbbbbbb"), gold=1),  # sums -2 vs -4: acc misses; per char -1 vs -0.5: norm hits
        TaskItem("q", (" a", " bbbbbbb"), gold=0),  # the reverse
        TaskItem("q", (" ccc", " dd"), gold=0),     # sums -1 vs -3; per char -0.25 vs -1: both hit
    )
    scores = {" a": -2.0, " bbbbbbb": -4.0, " ccc": -1.0, " dd": -3.0}

    def loglikelihoods(pairs):
        return [scores["".join(chr(t) for t in continuation)] for _, continuation in pairs]

    result = score_task(Task("t", items, "t.jsonl", "0"), _Tokenizer(), loglikelihoods, max_len=64)
    assert (result.acc, result.acc_norm, result.num_items) == (2 / 3, 2 / 3, 3)
    assert result.gold_loglikelihood == pytest.approx((-4.0 - 2.0 - 1.0) / 3)
    limited = score_task(Task("t", items, "t.jsonl", "0"), _Tokenizer(), loglikelihoods, max_len=64, limit=1)
    assert (limited.acc, limited.acc_norm, limited.num_items) == (0.0, 1.0, 1)


def test_pairs_get_bos_on_the_context_only_and_long_contexts_lose_their_start():
    seen = []

    def loglikelihoods(pairs):
        seen.extend(pairs)
        return [0.0] * len(pairs)

    item = TaskItem("abcdefghij", (" xy", " z"), gold=0)
    score_task(Task("t", (item,), "t.jsonl", "0"), _Tokenizer(), loglikelihoods, max_len=8)
    (context_1, continuation_1), (context_2, continuation_2) = seen
    assert continuation_1 == [ord(c) for c in " xy"] and continuation_2 == [ord(c) for c in " z"]
    # 11 context tokens (BOS + 10) cut to the last 8 - 3 and 8 - 2.
    assert context_1 == [ord(c) for c in "fghij"] and context_2 == [ord(c) for c in "efghij"]


def test_a_choice_longer_than_the_window_is_an_error_naming_the_item():
    item = TaskItem("a", (" bcdefgh", " i"), gold=0)
    with pytest.raises(LmcError, match="item 1"):
        score_task(Task("t", (item,), "t.jsonl", "0"), _Tokenizer(), lambda pairs: [0.0] * len(pairs), max_len=4)


def test_the_builtin_task_is_far_above_chance_for_the_reference_model(reference_paths):
    """A real tokenizer, a hand-rolled transformers scorer: the task is learnable, not noise (chance is 0.25)."""
    import torch

    from lmcompress.formats.loader import load_dequantized_model

    model_dir, _, _ = reference_paths
    model = load_dequantized_model(model_dir)

    def loglikelihoods(pairs):
        scores = []
        with torch.inference_mode():
            for context, continuation in pairs:
                logits = model(input_ids=torch.tensor([context + continuation])).logits[0]
                logprobs = logits[len(context) - 1 : -1].log_softmax(-1)
                scores.append(logprobs[torch.arange(len(continuation)), torch.tensor(continuation)].sum().item())
        return scores

    result = score_task(load_task(BUILTIN), AutoTokenizer.from_pretrained(model_dir), loglikelihoods,
                        max_len=1024, limit=24)
    assert result.acc >= 0.5 and result.acc < 1.0


def test_lmc_eval_task_names_the_bad_line_in_one_line(tmp_path, reference_paths):
    model_dir, _, _ = reference_paths
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "a", "choices": [" b", " c"], "gold": 0}\n{"context": "a"}\n')
    result = CliRunner().invoke(cli, ["eval", "task", str(model_dir), "--task", str(path), "--device", "cpu"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert f"{path} line 2: 'choices' must be a list" in result.output
