"""Eval records: which data is scored, and what each record's prompt and reference are.

Contract:
    eval_splits(data_cfg, files, seed, cache_dir) -> list[Split]
        `files` given: each file whole (JSONL `messages`, or the type its name says), named by
        its file name; else the eval splits of the config's sources, as the trainer sees them.
    read_items(splits, regex) -> (items, bad record counts by reason)

A record's reference is its `reference` field when it has one, else the content of its
last message when that is an assistant turn. The prompt is the conversation without that
final assistant turn, so it never holds the reference. `task` is the record's `task` or
`category` field; `split` its `split` field (the quality suite's seen / unseen phrasing /
unseen task); `regex` its `reference_regex` field, else `eval.regex`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxsft.config import DataConfig, SourceConfig
from jaxsft.data.formats import BadRecord, Conversation
from jaxsft.data.pipeline import DataError
from jaxsft.data.reading import Split, resolve_sources


@dataclasses.dataclass
class Item:
    source: str
    where: str  # file:line
    conversation: Conversation
    task: str  # "" when the record has no task/category field
    prompt: Conversation  # the messages a generation continues
    reference: str | None
    regex: str | None
    split: str = ""  # "" when the record has no split field


def eval_splits(data_cfg: DataConfig, files: Sequence[str], seed: int, cache_dir: Path) -> list[Split]:
    if files:
        sources = tuple(SourceConfig(path=f, eval_path=f) for f in files)
        data_cfg = dataclasses.replace(data_cfg, sources=sources, train_files=(), eval_files=(), stages=())
    _, evals = resolve_sources(data_cfg, seed, cache_dir)
    evals = [s for s in evals if len(s.ids)]
    if not evals:
        raise DataError(
            "eval: the config's sources hold no eval records (no eval_path, eval_fraction or eval_files); "
            "pass --data FILE"
        )
    return evals


def _field(raw: Any, *names: str) -> Any:
    if not isinstance(raw, dict):
        return None
    return next((raw[n] for n in names if raw.get(n) is not None), None)


def _reference(raw: Any, conversation: Conversation) -> tuple[Conversation, str | None]:
    ends_with_answer = bool(conversation) and conversation[-1].role == "assistant"
    prompt = conversation[:-1] if ends_with_answer else conversation
    given = _field(raw, "reference")
    if isinstance(given, (str, int, float)) and not isinstance(given, bool):
        return prompt, str(given)
    return prompt, conversation[-1].content if ends_with_answer else None


def _checked_regex(pattern: Any, where: str) -> str | None:
    if pattern in (None, ""):
        return None
    if not isinstance(pattern, str):
        raise DataError(f"{where}: reference_regex must be a string, got {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise DataError(f"{where}: reference_regex {pattern!r} is not a valid regular expression ({e})") from None
    return pattern


def read_items(splits: Sequence[Split], regex: str = "") -> tuple[list[Item], dict[str, int]]:
    default_regex = _checked_regex(regex, "eval.regex")
    items, bad = [], {}
    for split in splits:
        for i, conversation in split.read():
            if isinstance(conversation, BadRecord):
                bad[conversation.reason] = bad.get(conversation.reason, 0) + 1
                continue
            raw = split.source.record(i)
            where = str(split.source.where(i))
            prompt, reference = _reference(raw, conversation)
            task = _field(raw, "task", "category")
            split_name = _field(raw, "split")
            items.append(
                Item(
                    split.name,
                    where,
                    conversation,
                    "" if task is None else str(task),
                    prompt,
                    reference,
                    _checked_regex(_field(raw, "reference_regex"), where) or default_regex,
                    "" if split_name is None else str(split_name),
                )
            )
    return items, bad
