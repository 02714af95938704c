"""Scores of one generated answer against its reference, and their tallies per group.

Contract:
    normalize(text) -> str           lower case, punctuation removed, whitespace collapsed
    final_answer(output) -> str      the text after the last `</think>` (reasoning models), "" when a
                                     `<think>` block never closed, else the output itself
    score(output, reference, regex) -> {metric: True | False | None}   (None: not applicable)
    tally(scores) -> {metric: {"hits", "of", "rate"}}                   (rate None when of == 0)
    loss_summary(loss_sum, weight, correct, examples) -> {"examples", "tokens", "loss", "perplexity", "token_accuracy"}

Metrics (every comparison ignores whitespace around the texts):
    exact_match        output == reference
    normalized_match   normalize(output) == normalize(reference)
    contains           the normalised reference occurs in the normalised output as whole words
    json_valid         the output parses as JSON; scored only where the reference is a JSON
                       object or array (a bare number or word is valid JSON and says nothing)
    regex_match        re.search(regex, output); scored only where a regex is given
"""

from __future__ import annotations

import json
import math
import re
import unicodedata

METRICS = ("exact_match", "normalized_match", "contains", "json_valid", "regex_match")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def final_answer(output: str) -> str:
    """What a reasoning model answered, without its thinking (Qwen3 / DeepSeek-R1 `<think>` blocks)."""
    if THINK_CLOSE in output:
        return output.rsplit(THINK_CLOSE, 1)[1]
    if output.lstrip().startswith(THINK_OPEN):
        return ""  # stopped (max_new_tokens) while still thinking: no answer
    return output


def normalize(text: str) -> str:
    # Unicode punctuation (category P*) becomes a space, so "a,b" and "a b" agree.
    spaced = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(spaced.split())


def _json_container(text: str) -> bool:
    try:
        return isinstance(json.loads(text), (dict, list))
    except (json.JSONDecodeError, RecursionError):
        return False


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def score(output: str, reference: str, regex: str | None = None) -> dict[str, bool | None]:
    out, ref = output.strip(), reference.strip()
    norm_out, norm_ref = normalize(out), normalize(ref)
    return {
        "exact_match": out == ref,
        "normalized_match": norm_out == norm_ref,
        "contains": bool(norm_ref) and f" {norm_ref} " in f" {norm_out} ",
        "json_valid": _parses(out) if _json_container(ref) else None,
        "regex_match": re.search(regex, output) is not None if regex else None,
    }


def tally(scores: list[dict[str, bool | None]]) -> dict[str, dict]:
    out = {}
    for metric in METRICS:
        values = [s[metric] for s in scores if s[metric] is not None]
        hits = sum(values)
        out[metric] = {"hits": hits, "of": len(values), "rate": hits / len(values) if values else None}
    return out


def loss_summary(loss_sum: float, weight: float, correct: float, examples: int) -> dict:
    """Mean loss over trained tokens (weighted as in training), its exp, and argmax accuracy."""
    if weight <= 0:
        return {"examples": examples, "tokens": 0.0, "loss": None, "perplexity": None, "token_accuracy": None}
    loss = loss_sum / weight
    return {
        "examples": examples,
        "tokens": weight,
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "token_accuracy": correct / weight,
    }
