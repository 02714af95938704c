"""Built-in tasks: reproducible, held out by prompt, and answers that are right."""

import collections
import json
import re

import pytest

from jaxsft.data import synthetic
from jaxsft.data.formats import parse_messages


def _user_prompts(records) -> list[str]:
    return [m["content"] for r in records for m in r["messages"] if m["role"] == "user"]


def test_reproducible_for_a_seed():
    assert synthetic.generate(300, 7, "train") == synthetic.generate(300, 7, "train")
    assert synthetic.generate(300, 7, "train") != synthetic.generate(300, 8, "train")
    # The eval split does not depend on how many train examples were asked for.
    assert synthetic.generate(50, 7, "eval") == synthetic.generate(80, 7, "eval")[:50]


def test_train_and_eval_prompts_are_disjoint():
    train = set(_user_prompts(synthetic.generate(5000, 0, "train")))
    held_out = set(_user_prompts(synthetic.generate(500, 0, "eval")))
    assert len(held_out) > 400
    assert train.isdisjoint(held_out)
    assert all(synthetic.bucket(p) == 0 for p in held_out) and all(synthetic.bucket(p) != 0 for p in train)


def test_records_are_valid_and_varied():
    records = synthetic.generate(2000, 1, "train")
    shapes = collections.Counter()
    for r in records:
        messages = parse_messages(r)
        roles = [m.role for m in messages]
        shapes["system"] += roles[0] == "system"
        shapes["multi_turn"] += roles.count("assistant") == 2
        assert roles[-2:] == ["user", "assistant"]
    assert 0.2 < shapes["system"] / 2000 < 0.4 and 0.12 < shapes["multi_turn"] / 2000 < 0.28
    prompts = _user_prompts(records)
    # Every task, and at least three phrasings of one, appear.
    for marker in (
        "What is",
        "Compute",
        "Calculate",
        "Reverse",
        "alphabetical",
        "letters",
        "upper case",
        "Capitalise",
        "Look up",
        "JSON array",
        "JSON object",
    ):
        assert any(marker in p for p in prompts), marker
    with pytest.raises(ValueError, match="split"):
        synthetic.generate(1, 0, "test")


def _expected(prompt: str) -> str | None:
    """Recomputes the answer of the tasks whose prompt pins the answer down."""
    if m := re.fullmatch(r"(?:What is |Calculate: )?(\d+) ([-+*]) (\d+)(?:\?| = \?)?", prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if m := re.fullmatch(r"Reverse the order of these words: (.*)", prompt):
        return " ".join(reversed(m[1].split()))
    if m := re.fullmatch(r"Sort these words alphabetically: (.*)", prompt):
        return " ".join(sorted(m[1].split()))
    if m := re.fullmatch(r"Convert to upper case: (.*)", prompt):
        return m[1].upper()
    if m := re.fullmatch(r"Given (.*), what is (\w)\?", prompt):
        return dict(kv.split("=") for kv in m[1].split(", "))[m[2]]
    if m := re.fullmatch(r"Convert this list to a JSON array: (.*)", prompt):
        return json.dumps(m[1].split(", "))
    if m := re.fullmatch(r"How many letters are in the word (\w+)\?", prompt):
        return str(len(m[1]))
    return None


def test_answers_are_correct():
    checked = 0
    for r in synthetic.generate(3000, 2, "train"):
        messages = r["messages"]
        for user, answer in zip(messages, messages[1:]):
            if user["role"] == "user" and (expected := _expected(user["content"])) is not None:
                assert answer["content"] == expected, user["content"]
                checked += 1
    assert checked > 500
