"""Sources from the config, and the one counting pass that every record goes through.

`resolve_sources(cfg, seed, cache_dir)` turns `data.sources` (or the shorthand
`train_files`/`eval_files`, or nothing: the synthetic tasks) into `Split`s: a `Source`,
the indices of its records in this split, and how to read them (`format`, `columns`).
Each source's eval split is its `eval_path`, else every round(1/eval_fraction)-th record
by position (deterministic, seed-free), else, for the synthetic tasks, their held-out
split. Without any eval source there is no eval set.

`count_split(split, encode, report)` reads a split once, in order: bad records and drops
are counted by reason (the first few with file:line), and the indices and token lengths
of the records that make examples come back: only those are ever sampled.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxsft.config import DataConfig, SourceConfig
from jaxsft.data import synthetic_tasks
from jaxsft.data.formats import BadRecord, Conversation, DataError, parse_record
from jaxsft.data.sources import (
    ArrayRecordSource,
    BadLine,
    JsonlSource,
    MemorySource,
    ParquetSource,
    Source,
    TfdsSource,
    expand_paths,
)

MAX_REPORTED = 10
LEGACY_EVAL_FRACTION = 0.02  # train_files without eval_files: every 50th record is eval


@dataclasses.dataclass
class DataReport:
    """What one split's data turned into; every number a user may want to check."""

    records: int = 0  # records read, bad ones included
    bad_records: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    bad_examples: list[str] = dataclasses.field(default_factory=list)  # first "file:line: reason" (bad or dropped)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # "no_trained_tokens", "overlong"
    # "whole turns", "inside a turn", "at max_length"
    truncations: dict[str, int] = dataclasses.field(default_factory=dict)
    examples: int = 0  # examples that train
    tokens: int = 0  # (input, target) positions of those examples
    trained_tokens: int = 0  # positions with a non-zero loss weight

    @property
    def truncated(self) -> int:
        return sum(self.truncations.values())

    def note(self, where: object) -> None:
        if len(self.bad_examples) < MAX_REPORTED:
            self.bad_examples.append(str(where))

    @property
    def lost(self) -> int:
        return sum(self.bad_records.values()) + sum(self.dropped.values())

    def add(self, other: DataReport) -> None:
        self.records += other.records
        for mine, theirs in (
            (self.bad_records, other.bad_records),
            (self.dropped, other.dropped),
            (self.truncations, other.truncations),
        ):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
        for b in other.bad_examples:
            self.note(b)
        self.examples += other.examples
        self.tokens += other.tokens
        self.trained_tokens += other.trained_tokens

    def summary_lines(self) -> list[str]:
        lines = [
            f"{self.records} records -> {self.examples} examples, {self.tokens} tokens "
            f"({self.trained_tokens} trained), {self.truncated} truncated"
        ]
        if self.lost:
            reasons = {**self.bad_records, **self.dropped}
            lines.append(f"{self.lost} dropped: " + ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())))
            lines += [f"  {b}" for b in self.bad_examples]
        return lines


@dataclasses.dataclass
class Split:
    name: str
    source: Source
    ids: np.ndarray  # indices into `source` of this split's records
    format: str = "messages"
    columns: dict = dataclasses.field(default_factory=dict)
    weight: float = 1.0

    def conversation(self, i: int) -> Conversation:
        """Record i of the source (not a position in `ids`) as messages; raises `BadRecord`."""
        return parse_record(self.source.record(i), self.format, self.columns)

    def read(self) -> Iterator[tuple[int, Conversation | BadRecord]]:
        """(record index, conversation or the reason it is bad), in order, sequentially."""
        wanted = np.zeros(len(self.source), dtype=bool)
        wanted[self.ids] = True
        for i, record in self.source:
            if not wanted[i]:
                continue
            if isinstance(record, BadRecord):
                yield i, record
                continue
            try:
                yield i, parse_record(record, self.format, self.columns)
            except BadRecord as e:
                yield i, e


def _source_type(src: SourceConfig, key: str) -> str:
    if src.type != "auto":
        return src.type
    path = src.path.lower()
    for suffix, kind in (
        (".jsonl", "jsonl"),
        (".jsonl.gz", "jsonl"),
        (".json", "jsonl"),
        (".json.gz", "jsonl"),
        (".parquet", "parquet"),
        (".arrayrecord", "arrayrecord"),
        (".array_record", "arrayrecord"),
    ):
        if path.endswith(suffix) or path.endswith(suffix + "*"):
            return kind
    raise DataError(
        f"{key}.type: cannot tell the type of {src.path!r} from its name; "
        "set type: jsonl | parquet | arrayrecord | tfds | synthetic"
    )


def check_files(cfg: DataConfig) -> None:
    """Every data file (or glob) exists: `DataError` naming the first missing one, before reading any."""
    patterns = [*cfg.train_files, *cfg.eval_files] if cfg.train_files and not cfg.sources else []
    for k, src in enumerate(cfg.sources):
        if _source_type(src, f"data.sources[{k}]") in ("jsonl", "parquet", "arrayrecord"):
            patterns += [src.path] + ([src.eval_path] if src.eval_path else [])
    expand_paths(patterns)


def _open(src: SourceConfig, kind: str, path: str, split: str, seed: int, cache_dir: Path) -> Source:
    if kind == "jsonl":
        return JsonlSource([path], cache_dir)
    if kind == "parquet":
        return ParquetSource([path])
    if kind == "arrayrecord":
        return ArrayRecordSource([path])
    if kind == "tfds":
        return TfdsSource(path, split, src.data_dir)
    n = src.examples if split == "train" else src.eval_examples
    return MemorySource(synthetic_tasks.task_set(path or "demo", n, seed, split, src.phrasings), f"synthetic:{split}")


def _held_out(n: int, fraction: float) -> np.ndarray:
    if fraction <= 0 or n < 2:
        return np.zeros(n, dtype=bool)
    held = np.zeros(n, dtype=bool)
    held[:: max(1, round(1 / fraction))] = True
    return held


def source_configs(cfg: DataConfig) -> list[SourceConfig]:
    """`data.sources`, or the synthetic tasks as one source (`train_files` are handled apart)."""
    if cfg.sources:
        return list(cfg.sources)
    return [
        SourceConfig(
            type="synthetic",
            name="synthetic",
            path=cfg.synthetic_tasks,
            format="text" if cfg.synthetic_tasks == "quality_text" else "messages",
            examples=cfg.synthetic_train_examples,
            eval_examples=cfg.synthetic_eval_examples,
        )
    ]


def _legacy_files(cfg: DataConfig, cache_dir: Path) -> tuple[list[Split], list[Split]]:
    source = JsonlSource(list(cfg.train_files), cache_dir)
    if cfg.eval_files:
        eval_source = JsonlSource(list(cfg.eval_files), cache_dir)
        return [Split("train_files", source, np.arange(len(source)))], [
            Split("train_files", eval_source, np.arange(len(eval_source)))
        ]
    held = _held_out(len(source), LEGACY_EVAL_FRACTION)
    return ([Split("train_files", source, np.flatnonzero(~held))], [Split("train_files", source, np.flatnonzero(held))])


def resolve_sources(cfg: DataConfig, seed: int, cache_dir: Path) -> tuple[list[Split], list[Split]]:
    """(train splits, eval splits), one pair per source (an eval split may be empty)."""
    if cfg.train_files and not cfg.sources:
        return _legacy_files(cfg, cache_dir)
    train, evals = [], []
    for k, src in enumerate(source_configs(cfg)):
        kind = _source_type(src, f"data.sources[{k}]")
        name = src.name or (Path(src.path).name if kind != "synthetic" else "synthetic")
        source = _open(src, kind, src.path, src.split, seed, cache_dir)
        held = _held_out(len(source), src.eval_fraction)
        common = dict(format=src.format, columns=dict(src.columns), weight=src.weight)
        train.append(Split(name, source, np.flatnonzero(~held), **common))
        if src.eval_path or (kind == "tfds" and src.eval_split) or kind == "synthetic":
            eval_source = _open(src, kind, src.eval_path or src.path, src.eval_split or "eval", seed, cache_dir)
            evals.append(Split(name, eval_source, np.arange(len(eval_source)), **common))
        else:
            evals.append(Split(name, source, np.flatnonzero(held), **common))
    names = [s.name for s in train]
    if len(set(names)) != len(names):
        raise DataError(f"data.sources: names {names} repeat; give each source a distinct name")
    return train, evals


PRIME_RECORDS = 512  # records whose texts the tokenizer encodes in one batch call


def count_split(
    split: Split,
    encode: Callable[[Conversation], Any] | None,
    report: DataReport,
    on_bad_record: str = "skip",
    prime: Callable[[list[Conversation]], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Counts one split into `report`; returns the good record indices and their token counts.

    `encode(messages)` returns a drop reason (str) or `(features, truncation reason or None)`;
    `prime(conversations)`, if given, is called on each block of records before they are
    encoded one by one (batch tokenization), and with `[]` at the end.
    """
    good, lengths = [], []
    records = iter(split.read())
    while block := list(itertools.islice(records, PRIME_RECORDS)):
        if prime is not None and encode is not None:
            prime([item for _, item in block if not isinstance(item, BadRecord)])
        for i, item in block:
            n = _count(split, i, item, encode, report, on_bad_record)
            if n is not None:
                good.append(i)
                lengths.append(n)
    if prime is not None:
        prime([])
    return np.asarray(good, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


def _count(split: Split, i: int, item, encode, report: DataReport, on_bad_record: str) -> int | None:
    """Counts one record into `report`; its token count when it makes an example."""
    where = split.source.where(i)
    report.records += 1
    if isinstance(item, BadRecord):
        report.bad_records[item.reason] = report.bad_records.get(item.reason, 0) + 1
        bad = BadLine(where.file, where.line, item.reason, item.detail)
    elif encode is None:  # counting bad records only
        return None
    else:
        out = encode(item)
        if not isinstance(out, str):
            features, truncation = out
            if truncation:
                report.truncations[truncation] = report.truncations.get(truncation, 0) + 1
            n = len(features["inputs"])
            report.examples += 1
            report.tokens += n
            report.trained_tokens += int(np.count_nonzero(features["loss_weights"]))
            return n
        report.dropped[out] = report.dropped.get(out, 0) + 1
        bad = f"{where}: {out}"
    report.note(bad)
    if on_bad_record == "raise":
        raise DataError(f"data.on_bad_record=raise: {bad}")
    return None


def training_texts(splits: list[Split], template) -> Iterator[str]:
    """The texts a SentencePiece tokenizer for `template` is trained on (bad records skipped)."""
    for split in splits:
        for _, item in split.read():
            if isinstance(item, BadRecord):
                continue
            try:
                yield from template.text_segments(item)
            except BadRecord:
                continue
