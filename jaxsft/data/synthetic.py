"""Built-in instruction tasks with checkable answers: the demo data and a small eval suite.

Contract: `generate(n, seed, split)` returns `n` records in the `messages` format (with a
`task` field: the task of the last answer),
the same for the same arguments on any machine (only `random.Random(seed)` and a
sha256 bucket are used). Splits are held out by prompt: every user prompt is put in a
bucket by the hash of its text, and `"eval"` uses only bucket 0 of 10 while `"train"`
never does, so no user prompt of the eval split appears anywhere in the train split.
Examples are short (about 20-80 tokens with a 512-piece tokenizer) so a small model
learns them in a few hundred CPU steps: some have a system prompt, some two exchanges.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

SPLITS = ("train", "eval")
EVAL_BUCKETS = 10  # one bucket in ten is held out for eval
SYSTEM_SHARE, MULTI_TURN_SHARE = 0.3, 0.2

WORDS = (
    "apple banana cherry grape lemon mango melon peach pear plum "
    "red green blue black white gold pink gray "
    "cat dog bird fish horse mouse lion tiger bear wolf "
    "sun moon star rain snow wind cloud river stone tree "
    "book pen cup door lamp road ship train clock chair"
).split()
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer with the result only.",
    "You are a precise assistant. Reply briefly.",
    "Be exact.",
)

Exchange = tuple[str, str]  # (user prompt, assistant answer)


def _words(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def arithmetic(rng: random.Random) -> Exchange:
    op = rng.choice("+-*")
    a, b = (rng.randint(0, 12), rng.randint(0, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    name = {"+": "plus", "-": "minus", "*": "times"}[op]
    prompt = rng.choice(
        (f"What is {a} {op} {b}?", f"Compute {a} {name} {b}.", f"Calculate: {a} {op} {b}", f"{a} {op} {b} = ?")
    )
    return prompt, str(a + b if op == "+" else a - b if op == "-" else a * b)


def reverse_words(rng: random.Random) -> Exchange:
    words = _words(rng)
    text = " ".join(words)
    prompt = rng.choice(
        (
            f"Reverse the order of these words: {text}",
            f"Write these words in reverse order: {text}",
            f"Reverse the word order.\n{text}",
        )
    )
    return prompt, " ".join(reversed(words))


def sort_words(rng: random.Random) -> Exchange:
    words = _words(rng)
    text = " ".join(words)
    prompt = rng.choice(
        (f"Sort these words alphabetically: {text}", f"Put in alphabetical order: {text}", f"Sort A to Z.\n{text}")
    )
    return prompt, " ".join(sorted(words))


def count(rng: random.Random) -> Exchange:
    if rng.random() < 0.5:
        word = rng.choice(WORDS)
        prompt = rng.choice(
            (
                f"How many letters are in the word {word}?",
                f"Count the letters in '{word}'.",
                f"Number of letters in {word}?",
            )
        )
        return prompt, str(len(word))
    words = _words(rng, 2, 7)
    text = " ".join(words)
    prompt = rng.choice((f"How many words are in: {text}", f"Count the words.\n{text}", f"Word count of '{text}'?"))
    return prompt, str(len(words))


def change_case(rng: random.Random) -> Exchange:
    text = " ".join(_words(rng, 2, 4))
    if rng.random() < 0.5:
        prompt = rng.choice(
            (f"Convert to upper case: {text}", f"Write in capital letters: {text}", f"UPPERCASE this: {text}")
        )
        return prompt, text.upper()
    prompt = rng.choice(
        (
            f"Capitalise each word: {text}",
            f"Title-case this: {text}",
            f"Make every word start with a capital letter: {text}",
        )
    )
    return prompt, " ".join(w.capitalize() for w in text.split())


def key_lookup(rng: random.Random) -> Exchange:
    keys = rng.sample("abcdefghkmnpqrstuvwxyz", rng.randint(3, 5))
    table = {k: rng.randint(0, 99) for k in keys}
    text = ", ".join(f"{k}={v}" for k, v in table.items())
    key = rng.choice(keys)
    prompt = rng.choice(
        (f"Given {text}, what is {key}?", f"{text}. Look up {key}.", f"Find the value of {key} in: {text}")
    )
    return prompt, str(table[key])


def convert_format(rng: random.Random) -> Exchange:
    if rng.random() < 0.5:
        words = _words(rng, 2, 4)
        text = ", ".join(words)
        prompt = rng.choice(
            (f"Convert this list to a JSON array: {text}", f"As a JSON array: {text}", f"Write [{text}] as JSON.")
        )
        return prompt, json.dumps(words)
    keys = rng.sample("abcdefgh", rng.randint(2, 3))
    table = {k: rng.randint(0, 9) for k in keys}
    text = ",".join(f"{k}:{v}" for k, v in table.items())
    prompt = rng.choice(
        (f"Convert {text} to a JSON object.", f"Write {text} as a JSON object.", f"JSON object for: {text}")
    )
    return prompt, json.dumps(table)


TASKS: tuple[Callable[[random.Random], Exchange], ...] = (
    arithmetic,
    reverse_words,
    sort_words,
    count,
    change_case,
    key_lookup,
    convert_format,
)


def bucket(prompt: str) -> int:
    """A stable split bucket (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % EVAL_BUCKETS


def in_split(prompt: str, split: str) -> bool:
    return (bucket(prompt) == 0) == (split == "eval")


def _exchange(rng: random.Random, split: str) -> tuple[str, str, str]:
    """(prompt, answer, task name)."""
    # Rejection sampling: about 1.1 tries for train and 10 for eval, each a few µs.
    while True:
        task = rng.choice(TASKS)
        prompt, answer = task(rng)
        if in_split(prompt, split):
            return prompt, answer, task.__name__


def _record(rng: random.Random, split: str) -> dict:
    messages = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(2 if rng.random() < MULTI_TURN_SHARE else 1):
        prompt, answer, task = _exchange(rng, split)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "task": task}  # the task of the last answer (the one `jaxsft eval` scores)


def generate(n: int, seed: int, split: str) -> list[dict]:
    """`n` reproducible records of the built-in tasks, from the given split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # A separate stream per split, so the eval set does not shift when n_train changes.
    rng = random.Random(f"jaxsft-synthetic/{seed}/{split}")
    return [_record(rng, split) for _ in range(n)]
