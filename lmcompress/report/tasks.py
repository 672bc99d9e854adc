"""Multiple-choice tasks scored by log-likelihood, and the built-in task made from the held-out text.

Task files are JSON Lines, one item per line (blank lines are skipped):

    {"context": "The cat sat", "choices": [" on the mat.", " of the war."], "gold": 0}

context: the text before the answer; choices: two or more continuations, each
scored as a whole after the context (lead it with the space that joins it to the
context); gold: the 0-based index of the right choice.  Other keys (e.g. "id") are
ignored.  This is lm-eval-harness' loglikelihood multiple-choice scheme:

    score(choice) = sum over the choice's tokens of log p(token | context, earlier choice tokens)
    acc       = share of items whose highest-scoring choice is gold
    acc_norm  = the same with each score divided by the choice's length in characters

Tokenization: the context with the tokenizer's default special tokens (so BOS
where the tokenizer adds one), each choice alone without special tokens.  A
context longer than the model's window is cut from the left.

The built-in task ("builtin") is tests/assets/ref-tasks/heldout-choice.jsonl,
built from lmcompress.reference.REFERENCE_HELDOUT by `python -m lmcompress.report.tasks`:
each held-out sentence of 10-40 words is cut in half; the choices are its true
second half and the second halves of three other sentences of about the same
length (so that length alone does not give the answer away), in a seeded order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from lmcompress.errors import LmcError

BUILTIN = "builtin"
BUILTIN_NAME = "heldout-choice"
BUILTIN_SEED = 0
BUILTIN_ITEMS = 500
NUM_CHOICES = 4
SCHEMA = '{"context": str, "choices": [str, ...], "gold": int}'

# A sentence ends at . ! or ? followed by space and a capital letter or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_MIN_WORDS, _MAX_WORDS = 10, 40
# Distractors come from this many sentences whose second half is closest in length to the true one.
_LENGTH_NEIGHBOURS = 24

# (context token ids, continuation token ids) -> summed log-probability of the continuation.
LoglikelihoodFn = Callable[[Sequence[tuple[list[int], list[int]]]], list[float]]


@dataclass(frozen=True)
class TaskItem:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple[TaskItem, ...]
    source: str  # the file it was read from
    sha256: str  # of that file, so a report records exactly which items it scored


@dataclass(frozen=True)
class TaskResult:
    task: str
    acc: float
    acc_norm: float
    gold_loglikelihood: float
    num_items: int


def builtin_task_path() -> Path:
    from lmcompress import reference

    return reference.REFERENCE_HELDOUT.parents[1] / "ref-tasks" / f"{BUILTIN_NAME}.jsonl"


def load_task(spec: str) -> Task:
    """The task `spec` names: "builtin" or a JSONL file path; malformed lines raise LmcError naming the line."""
    path = builtin_task_path() if spec == BUILTIN else Path(spec)
    if not path.is_file():
        raise LmcError(f"task file {path} not found; pass --task builtin or a JSONL file of {SCHEMA} lines")
    raw = path.read_bytes()
    items = []
    for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            items.append(_parse_item(line, path, number))
    if not items:
        raise LmcError(f"task file {path} has no items; write one {SCHEMA} object per line")
    name = BUILTIN_NAME if spec == BUILTIN else path.stem
    return Task(name=name, items=tuple(items), source=str(path), sha256=hashlib.sha256(raw).hexdigest())


def _parse_item(line: str, path: Path, number: int) -> TaskItem:
    def bad(problem: str) -> LmcError:
        return LmcError(f"{path} line {number}: {problem}; each line must be a JSON object {SCHEMA}")

    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise bad(f"expected an object, got {type(record).__name__}")
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    if not isinstance(context, str):
        raise bad("'context' must be a string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise bad("'choices' must be a list of two or more non-empty strings")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise bad(f"'gold' must be an integer index into the {len(choices)} choices")
    return TaskItem(context=context, choices=tuple(choices), gold=gold)


def score_task(task: Task, tokenizer, loglikelihoods: LoglikelihoodFn, max_len: int,
               limit: int | None = None) -> TaskResult:
    """Accuracy of the model behind `loglikelihoods` on the first `limit` items (all when None)."""
    items = task.items[:limit] if limit is not None else task.items
    requests = [pair for number, item in enumerate(items, start=1)
                for pair in _requests(item, tokenizer, max_len, task, number)]
    scores = loglikelihoods(requests)
    correct = correct_norm = 0
    gold_total = 0.0
    position = 0
    for item in items:
        item_scores = scores[position : position + len(item.choices)]
        position += len(item.choices)
        normalised = [score / len(choice) for score, choice in zip(item_scores, item.choices)]
        correct += _argmax(item_scores) == item.gold
        correct_norm += _argmax(normalised) == item.gold
        gold_total += item_scores[item.gold]
    count = len(items)
    return TaskResult(task=task.name, acc=correct / count, acc_norm=correct_norm / count,
                      gold_loglikelihood=gold_total / count, num_items=count)


def _requests(item: TaskItem, tokenizer, max_len: int, task: Task, number: int) -> list[tuple[list[int], list[int]]]:
    context = tokenizer(item.context)["input_ids"]
    pairs = []
    for choice in item.choices:
        continuation = tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not context or len(continuation) >= max_len:
            raise LmcError(
                f"{task.source} item {number}: the context is empty or a choice of {len(continuation)} tokens "
                f"leaves no room for context in the model's {max_len}-token window; shorten that item"
            )
        # Keep the last tokens of the context when the pair would not fit the window.
        pairs.append((context[-(max_len - len(continuation)):], continuation))
    return pairs


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def build_heldout_items(text: str, num_items: int = BUILTIN_ITEMS, seed: int = BUILTIN_SEED) -> list[TaskItem]:
    """Cloze items from `text`: each picks a sentence's true second half among four."""
    halves = _sentence_halves(text)
    if len(halves) < max(num_items, _LENGTH_NEIGHBOURS + 1):
        raise LmcError(
            f"the text has {len(halves)} usable sentences ({_MIN_WORDS}-{_MAX_WORDS} words), fewer than the "
            f"{num_items} items asked for; pass a longer text or fewer items"
        )
    rng = random.Random(seed)
    by_length = sorted(range(len(halves)), key=lambda index: len(halves[index][1]))
    rank = {index: position for position, index in enumerate(by_length)}
    items = []
    for index in sorted(rng.sample(range(len(halves)), num_items)):
        context, truth = halves[index]
        distractors = rng.sample(_length_neighbours(index, by_length, rank, halves), NUM_CHOICES - 1)
        choices = [truth, *distractors]
        rng.shuffle(choices)
        items.append(TaskItem(context=context, choices=tuple(choices), gold=choices.index(truth)))
    return items


def _sentence_halves(text: str) -> list[tuple[str, str]]:
    """(first half, " " + second half) of each distinct sentence of 10-40 words, in text order."""
    seen, halves = set(), []
    for line in text.splitlines():
        for sentence in _SENTENCE_END.split(line.strip()):
            words = sentence.split()
            if _MIN_WORDS <= len(words) <= _MAX_WORDS and sentence not in seen:
                seen.add(sentence)
                cut = len(words) // 2
                halves.append((" ".join(words[:cut]), " " + " ".join(words[cut:])))
    return halves


def _length_neighbours(index: int, by_length: list[int], rank: dict[int, int],
                       halves: list[tuple[str, str]]) -> list[str]:
    """Second halves of the sentences nearest in length to sentence `index`'s, other texts only."""
    position = rank[index]
    low = max(0, min(position - _LENGTH_NEIGHBOURS // 2, len(by_length) - _LENGTH_NEIGHBOURS - 1))
    window = by_length[low : low + _LENGTH_NEIGHBOURS + 1]
    truth = halves[index][1]
    return sorted({halves[other][1] for other in window if other != index and halves[other][1] != truth})


def write_task(path: str | Path, items: Sequence[TaskItem]) -> None:
    lines = [json.dumps({**asdict(item), "choices": list(item.choices)}, ensure_ascii=False) for item in items]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    from lmcompress import reference

    parser = argparse.ArgumentParser(description="Build the built-in multiple-choice task from the held-out text.")
    parser.add_argument("--heldout", default=None, help="held-out text (default: the reference corpus')")
    parser.add_argument("--out", default=None, help="output JSONL (default: the built-in task's file)")
    parser.add_argument("--items", type=int, default=BUILTIN_ITEMS)
    parser.add_argument("--seed", type=int, default=BUILTIN_SEED)
    args = parser.parse_args(argv)
    heldout = Path(args.heldout or reference.REFERENCE_HELDOUT)
    out = Path(args.out or builtin_task_path())
    out.parent.mkdir(parents=True, exist_ok=True)
    write_task(out, build_heldout_items(heldout.read_text(encoding="utf-8"), args.items, args.seed))
    print(f"wrote {args.items} items to {out}")


if __name__ == "__main__":
    main()
