"""Verifiers: is a generated answer correct, for records that carry a checker.

Job: turn a prompt record's `task` and reference into a function of the answer text.

Contract:
    answer_text(text) -> str              the answer without a leading `<think>...</think>` block
    checker(task, reference, regex) -> Callable[[str], bool] | None    None: nothing to check with
    vote_key(text) -> str                 what majority voting compares (metrics.normalize of the answer)

A record carries a checker when it has a reference (its `reference` field, or the content
of a final assistant turn) or a `reference_regex`. How a reference is compared depends on
the task, so that an answer is not failed for spacing or key order:

    json       (convert_format, tool_call)                the parsed JSON values are equal
    number     (arithmetic, arithmetic_steps, count,      the same number ("12" == "12.0")
                key_lookup)
    words      (everything else: the built-in tasks and   the same text after collapsing
                any task name not listed)                 whitespace; case and punctuation count

With a `reference_regex` the answer must also match it (re.search).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from jaxsft.eval import metrics

THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)
JSON_TASKS = frozenset({"convert_format", "tool_call"})
NUMBER_TASKS = frozenset({"arithmetic", "arithmetic_steps", "count", "key_lookup"})


def answer_text(text: str) -> str:
    return THINK.sub("", text).strip()


def vote_key(text: str) -> str:
    return metrics.normalize(answer_text(text))


def _words(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _json(a: str, b: str) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except (json.JSONDecodeError, RecursionError):
        return _words(a, b)


def _number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return _words(a, b)


def compare(task: str) -> Callable[[str, str], bool]:
    """How an answer is compared with a reference for `task`."""
    return _json if task in JSON_TASKS else _number if task in NUMBER_TASKS else _words


def checker(task: str, reference: str | None, regex: str | None = None) -> Callable[[str], bool] | None:
    if reference is None and not regex:
        return None
    same = compare(task)
    pattern = re.compile(regex) if regex else None

    def check(text: str) -> bool:
        answer = answer_text(text)
        if pattern is not None and not pattern.search(answer):
            return False
        return reference is None or same(answer, reference.strip())

    return check
