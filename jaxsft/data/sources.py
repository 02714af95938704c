"""Random-access record sources: JSONL, Parquet, ArrayRecord, TFDS, and in-memory records.

Contract of a source: `len(source)`, `source.record(i)` (the raw record, a dict, or
`BadRecord` for invalid UTF-8 / JSON), `source.where(i)` (a `Where` that prints as
`file:line`, 1-based), and `iter(source)` yielding `(i, record or BadRecord)` in order,
as fast as the storage allows. Sources pickle (Grain worker processes read them).

- `JsonlSource(patterns, cache_dir)`: plain or gzip files and globs. The byte offset of
  every non-blank line is indexed once and cached under `cache_dir/index/` keyed by
  path, size and mtime; a `.gz` file is decompressed once into `cache_dir/jsonl/`, so
  random access is one seek and one read either way. Blank lines are skipped, not bad.
- `ParquetSource`: rows as dicts. `ArrayRecordSource`: each record a UTF-8 JSON object.
- `TfdsSource`: `tfds.data_source(name, split, data_dir)` of a dataset prepared locally
  (never downloaded); bytes features are decoded as UTF-8 text.
- `MemorySource`: records already in memory (the synthetic tasks).
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxsft.data.formats import BadRecord, DataError


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


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """One JSON document (a line, a record) -> Python; raises `BadRecord`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRecord("invalid UTF-8", f"byte {e.start}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecord("invalid JSON", f"{e.msg} at column {e.colno}") from None
    except RecursionError:
        raise BadRecord("invalid JSON", "nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise BadRecord("invalid JSON", str(e).split(";")[0]) from None
    if SURROGATE_ESCAPE.search(text):  # "\ud800" alone decodes to a string no tokenizer can encode
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except (UnicodeEncodeError, RecursionError):
            raise BadRecord("invalid UTF-8", "a lone surrogate \\u escape") from None
    return value


class Source:
    name = ""

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, i: int) -> Any:
        raise NotImplementedError

    def where(self, i: int) -> Where:
        raise NotImplementedError

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for i in range(len(self)):
            try:
                yield i, self.record(i)
            except BadRecord as e:
                yield i, e


# ---------------------------------------------------------------------------- JSONL


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
        keep[i] = bool(bytes(data[starts[i] : ends[i]]).strip())
    return keep


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _readable(path: Path, cache_dir: Path | None) -> Path:
    """A plain file with the bytes of `path` (gzip decompressed once into the cache)."""
    if path.suffix != ".gz":
        return path
    if cache_dir is None:
        raise DataError(f"data file {path}: gzip files need a cache directory")
    out = cache_dir / "jsonl" / f"{_file_key(path)}.jsonl"
    if not out.is_file():
        try:
            with gzip.open(path, "rb") as src:
                _write_atomic(out, lambda tmp: tmp.write_bytes(src.read()))
        except (OSError, EOFError) as e:
            raise DataError(f"data file {path}: cannot decompress: {e}") from None
    return out


def _index(path: Path, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, ends, 1-based line numbers) of the non-blank lines, cached by file identity."""
    cached = None if cache_dir is None else cache_dir / "index" / f"{_file_key(path)}.npz"
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            return z["starts"], z["ends"], z["lines"]
    data = np.fromfile(path, dtype=np.uint8)
    s, e = _line_spans(data)
    keep = _non_blank(data, s, e)
    out = s[keep].astype(np.int64), e[keep].astype(np.int64), (np.flatnonzero(keep) + 1).astype(np.int64)
    if cached is not None:
        _write_atomic(cached, lambda tmp: np.savez(open(tmp, "wb"), starts=out[0], ends=out[1], lines=out[2]))
    return out


class JsonlSource(Source):
    """Line-indexed JSONL files; random access opens, seeks and reads one line."""

    def __init__(self, patterns: Sequence[str], cache_dir: str | Path | None = None):
        cache = Path(cache_dir) if cache_dir is not None else None
        self.files = [str(p) for p in expand_paths(patterns)]
        self._readable = [str(_readable(Path(p), cache)) for p in self.files]
        parts = [_index(Path(p), cache) for p in self._readable]
        self._file = np.concatenate(
            [np.full(len(p[0]), f, np.int32) for f, p in enumerate(parts)] or [np.zeros(0, np.int32)]
        )
        self._start, self._end, self._line = (
            np.concatenate([p[k] for p in parts] or [np.zeros(0, np.int64)]) for k in range(3)
        )

    def __len__(self) -> int:
        return len(self._start)

    def where(self, i: int) -> Where:
        return Where(self.files[self._file[i]], int(self._line[i]))

    def raw(self, i: int) -> bytes:
        with open(self._readable[self._file[i]], "rb") as f:
            f.seek(int(self._start[i]))
            return f.read(int(self._end[i] - self._start[i]))

    def record(self, i: int) -> Any:
        return parse_json(self.raw(i))

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        """Sequential reading: each file is read once, not once per line."""
        for f, path in enumerate(self._readable):
            data = Path(path).read_bytes()
            for i in np.flatnonzero(self._file == f):
                try:
                    yield int(i), parse_json(data[self._start[i] : self._end[i]])
                except BadRecord as e:
                    yield int(i), e


# ---------------------------------------------------------------------------- columnar / record files


class _Concat(Source):
    """Several files of `count` records each, addressed as one sequence."""

    def _set_counts(self, counts: Sequence[int]) -> None:
        self._offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        f = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return f, i - int(self._offsets[f])

    def where(self, i: int) -> Where:
        f, j = self._locate(i)
        return Where(self.files[f], j + 1)


class ParquetSource(_Concat):
    """Parquet rows as dicts; `where` gives file:row (1-based)."""

    def __init__(self, patterns: Sequence[str]):
        import pyarrow.parquet as pq

        self.files = [str(p) for p in expand_paths(patterns)]
        try:
            self._tables = [pq.read_table(p) for p in self.files]
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError with long messages
            raise DataError(f"data: cannot read parquet {self.files}: {' '.join(str(e).split())[:200]}") from None
        self._set_counts([t.num_rows for t in self._tables])

    def record(self, i: int) -> Any:
        f, j = self._locate(i)
        return self._tables[f].slice(j, 1).to_pylist()[0]


class ArrayRecordSource(_Concat):
    """ArrayRecord files whose records are UTF-8 JSON objects."""

    def __init__(self, patterns: Sequence[str]):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self.files = [str(p) for p in expand_paths(patterns)]
        self._sources = [ArrayRecordDataSource([p]) for p in self.files]
        self._set_counts([len(s) for s in self._sources])

    def record(self, i: int) -> Any:
        f, j = self._locate(i)
        return parse_json(self._sources[f][j])


def _plain(value: Any) -> Any:
    """TFDS features -> JSON-like Python: bytes as text, arrays as lists."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid UTF-8", f"byte {e.start}") from None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _plain(value.item()) if value.ndim == 0 else [_plain(v) for v in value]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class TfdsSource(Source):
    def __init__(self, name: str, split: str, data_dir: str):
        import tensorflow_datasets as tfds

        self.label = f"tfds:{name}/{split}"
        try:
            self._source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, try_gcs=False)
        except Exception as e:  # tfds raises many types; the message is what the user needs
            raise DataError(
                f"data.sources: TFDS dataset {name!r} split {split!r} in {data_dir or 'the default dir'}"
                f" is not prepared locally: {' '.join(str(e).split())[:200]}"
            ) from None

    def __len__(self) -> int:
        return len(self._source)

    def record(self, i: int) -> Any:
        return _plain(self._source[i])

    def where(self, i: int) -> Where:
        return Where(self.label, i + 1)


class MemorySource(Source):
    def __init__(self, records: Sequence[Any], label: str):
        self.records, self.label = records, label

    def __len__(self) -> int:
        return len(self.records)

    def record(self, i: int) -> Any:
        return self.records[i]

    def where(self, i: int) -> Where:
        return Where(self.label, i + 1)


def load_jsonl(paths: Sequence[str]):
    """Every good `messages` line with its location, and every bad line with its reason."""
    from jaxsft.data.formats import parse_messages

    good, bad = [], []
    source = JsonlSource(paths)
    for i, record in source:
        where = source.where(i)
        try:
            if isinstance(record, BadRecord):
                raise record
            good.append((parse_messages(record), where))
        except BadRecord as e:
            bad.append(BadLine(where.file, where.line, e.reason, e.detail))
    return good, bad
