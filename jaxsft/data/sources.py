"""Random-access record sources: JSONL files indexed by line.

Contract:
- `expand_paths(patterns)` resolves files and glob patterns in order; a missing file or
  a pattern that matches nothing raises `DataError` with a one-line message.
- `JsonlSource(paths)` indexes the byte offset of every non-blank line once (blank
  lines are skipped, not bad). `source[i]` returns `(messages, Where)` for a good line
  and `(None, BadLine)` for a bad one: invalid UTF-8, invalid JSON, or a structure
  `formats.parse_messages` rejects. `Where`/`BadLine` print as `file:line[: reason]`,
  with 1-based line numbers as an editor shows them.
- `load_jsonl(paths)` reads every line once, sequentially: `(good, bad)`.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxsft.data.formats import BadRecord, Conversation, parse_messages


class DataError(RuntimeError):
    """The data cannot be used as configured; the message is one line, fit to print."""


@dataclasses.dataclass(frozen=True)
class Where:
    file: str
    line: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclasses.dataclass(frozen=True)
class BadLine(Where):
    reason: str = ""
    detail: str = ""

    def __str__(self) -> str:
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.file}:{self.line}: {self.reason}{detail}"


def expand_paths(patterns: Sequence[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise DataError(f"data file pattern {pattern!r} matches no file")
            paths.extend(Path(m) for m in matches)
        elif Path(pattern).is_file():
            paths.append(Path(pattern))
        else:
            raise DataError(f"data file {pattern} does not exist")
    return paths


def parse_line(raw: bytes) -> Conversation:
    """One JSONL line (without its newline) -> messages; raises `BadRecord`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid UTF-8", f"byte {e.start}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("invalid JSON", f"{e.msg} at column {e.colno}") from None
    return parse_messages(record)


def _line_spans(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end byte offsets of every line of a file (end excludes the newline)."""
    newlines = np.flatnonzero(data == ord("\n"))
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(data)]])
    return starts, ends


def _non_blank(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    # Only short lines are looked at one by one (a whitespace-only line longer than
    # 64 bytes is reported as invalid JSON instead), so indexing millions of lines
    # stays a few vectorised passes.
    keep = np.ones(len(starts), dtype=bool)
    for i in np.flatnonzero(ends - starts <= 64):
        keep[i] = bool(bytes(data[starts[i]:ends[i]]).strip())
    return keep


class JsonlSource:
    """Line-indexed JSONL files; random access opens, seeks and reads one line."""

    def __init__(self, paths: Sequence[str]):
        self.files = [str(p) for p in expand_paths(paths)]
        file_ids, starts, ends, lines = [], [], [], []
        for f, path in enumerate(self.files):
            data = np.fromfile(path, dtype=np.uint8)
            s, e = _line_spans(data)
            keep = _non_blank(data, s, e)
            file_ids.append(np.full(int(keep.sum()), f, dtype=np.int32))
            starts.append(s[keep])
            ends.append(e[keep])
            lines.append(np.flatnonzero(keep) + 1)
        self._file = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self._start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._end = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        self._line = np.concatenate(lines) if lines else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._start)

    def where(self, i: int) -> Where:
        return Where(self.files[self._file[i]], int(self._line[i]))

    def raw(self, i: int) -> bytes:
        with open(self.files[self._file[i]], "rb") as f:
            f.seek(int(self._start[i]))
            return f.read(int(self._end[i] - self._start[i]))

    def __getitem__(self, i: int) -> tuple[Conversation | None, Where]:
        where = self.where(i)
        try:
            return parse_line(self.raw(i)), where
        except BadRecord as e:
            return None, BadLine(where.file, where.line, e.reason, e.detail)

    def __iter__(self) -> Iterator[tuple[Conversation | None, Where]]:
        """Sequential reading: each file is read once, not once per line."""
        for f, path in enumerate(self.files):
            data = Path(path).read_bytes()
            for i in np.flatnonzero(self._file == f):
                where = Where(path, int(self._line[i]))
                try:
                    yield parse_line(data[self._start[i]:self._end[i]]), where
                except BadRecord as e:
                    yield None, BadLine(path, where.line, e.reason, e.detail)


def load_jsonl(paths: Sequence[str]) -> tuple[list[tuple[Conversation, Where]], list[BadLine]]:
    """Every good line with its location, and every bad line with its reason."""
    good, bad = [], []
    for messages, where in JsonlSource(paths):
        if messages is None:
            bad.append(where)
        else:
            good.append((messages, where))
    return good, bad
