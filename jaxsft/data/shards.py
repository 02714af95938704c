"""Virtual shards: a train stream that does not depend on the number of processes.

The packed-row stream is split into a fixed number V of virtual shards
(`data.virtual_shards`). Shard v is its own deterministic Grain graph (samples
v, v+V, ... of the mixture -> read -> encode -> pack -> batch of rows/V rows), and
row r of the global batch of `rows` rows comes from shard r // (rows/V): shards are
contiguous blocks of rows, as devices hold contiguous blocks of the batch axis. So the
global batch at step s depends on (config, seed, s) only. A process builds just the
shards whose rows land on its devices (`shards_for_rows`), all V with one process.

State: `Concat` (the shards a process owns, side by side) keeps each shard's state
in a node `{"virtual_shards": {"v": state}}`, wherever prefetchers or a curriculum
wrap it. `Sharded`, the outermost iterator, saves `{"virtual_shards": {"v": tree_v},
"virtual_shard_count": V}`, where tree_v is the whole state with every such node cut
down to shard v (`project`). Any process count restores it: a process gathers the
shard trees of every process's file and merges those it owns (`merge`); the parts
outside the shard nodes (steps, stage, prefetch counters) are the same for all
shards, since they all advance one batch per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxsft.data.formats import DataError

KEY = "virtual_shards"


AUTO_MAX = 8  # data.virtual_shards=0: the batch's largest divisor up to this


def shard_count(configured: int, rows: int) -> int:
    """V for batches of `rows` rows: `data.virtual_shards`, or under 0 the largest divisor
    of `rows` up to AUTO_MAX (a function of the config alone, like every stream choice)."""
    if configured == 0:
        return max(d for d in range(1, min(rows, AUTO_MAX) + 1) if rows % d == 0)
    if configured < 0 or rows % configured:
        raise DataError(
            f"data.virtual_shards={configured}: expected 0 (auto) or a divisor of the {rows} rows of a batch"
        )
    return configured


def shard_rows(rows: int, virtual_shards: int) -> int:
    return rows // shard_count(virtual_shards, rows)


def shards_for_rows(row_ids: Sequence[int], rows: int, virtual_shards: int) -> list[int]:
    """The virtual shards that hold the given global rows, ascending."""
    per_shard = shard_rows(rows, virtual_shards)
    return sorted({int(r) // per_shard for r in row_ids})


def rows_of_shards(shards: Sequence[int], rows: int, virtual_shards: int) -> np.ndarray:
    """The global row of each row of a batch built from `shards` (their blocks, in order)."""
    per_shard = shard_rows(rows, virtual_shards)
    return np.concatenate([np.arange(v * per_shard, (v + 1) * per_shard) for v in shards])


def project(state: Any, v: int) -> Any:
    """The state with every shard node cut down to shard v."""
    if isinstance(state, dict):
        if KEY in state and isinstance(state[KEY], dict):
            return {**state, KEY: {str(v): state[KEY][str(v)]}}
        return {k: project(x, v) for k, x in state.items()}
    if isinstance(state, list):
        return [project(x, v) for x in state]
    return state


def merge(states: Sequence[Any]) -> Any:
    """The inverse of `project`: shard trees (same shape outside the shard nodes) -> one state."""
    first = states[0]
    if isinstance(first, dict):
        if KEY in first and isinstance(first[KEY], dict):
            return {**first, KEY: {k: x for s in states for k, x in s[KEY].items()}}
        return {k: merge([s[k] for s in states]) for k in first}
    if isinstance(first, list):
        return [merge([s[i] for s in states]) for i in range(len(first))]
    return first


class _ConcatIterator(grain.DatasetIterator):
    def __init__(self, parents: Sequence[grain.DatasetIterator], shards: Sequence[int]):
        super().__init__(list(parents))
        self._iterators, self._shards = list(parents), list(shards)

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self._iterators]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict:
        return {KEY: {str(v): it.get_state() for v, it in zip(self._shards, self._iterators)}}

    def set_state(self, state: dict) -> None:
        for v, it in zip(self._shards, self._iterators):
            it.set_state(state[KEY][str(v)])


class Concat(grain.IterDataset):
    """The batches of several virtual shards, row blocks side by side (shard order)."""

    def __init__(self, datasets: Sequence[grain.IterDataset], shards: Sequence[int]):
        super().__init__(list(datasets))
        self._datasets, self._shards = list(datasets), list(shards)

    def __iter__(self) -> _ConcatIterator:
        return _ConcatIterator([d.__iter__() for d in self._datasets], self._shards)

    def __str__(self) -> str:
        return f"Concat(virtual shards {self._shards})"


class _ShardedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, shards: Sequence[int], count: int):
        super().__init__(parent)
        self._shards, self._count = list(shards), count

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        state = self._parent.get_state()
        return {KEY: {str(v): project(state, v) for v in self._shards}, "virtual_shard_count": self._count}

    def set_state(self, state: dict) -> None:
        """Takes the state of any superset of this iterator's shards (e.g. every process's, merged)."""
        if KEY not in state:
            raise DataError("the data state holds no virtual shards (written before data.virtual_shards existed)")
        saved = sorted(int(v) for v in state[KEY])
        if state.get("virtual_shard_count") != self._count or not set(self._shards) <= set(saved):
            raise DataError(
                f"data.virtual_shards={self._count}, but the saved data state has shards {saved} of "
                f"{state.get('virtual_shard_count')}: resume with the data.virtual_shards of the run"
            )
        self._parent.set_state(merge([state[KEY][str(v)] for v in self._shards]))


class Sharded(grain.IterDataset):
    """The outermost dataset of a train stream: its state is keyed by virtual shard."""

    def __init__(self, parent: grain.IterDataset, shards: Sequence[int], count: int):
        super().__init__(parent)
        self._shards, self._count = list(shards), count

    def __iter__(self) -> _ShardedIterator:
        return _ShardedIterator(self._parent.__iter__(), self._shards, self._count)

    def __str__(self) -> str:
        return f"Sharded({self._shards} of {self._count})"


def merge_process_states(states: Sequence[dict]) -> dict:
    """The states saved by every process of a run -> one state holding every shard they saved."""
    out = {KEY: {}, "virtual_shard_count": None}
    for s in states:
        if KEY not in s:
            raise DataError("the data state holds no virtual shards (written before data.virtual_shards existed)")
        out[KEY].update(s[KEY])
        out["virtual_shard_count"] = s.get("virtual_shard_count")
    return out
