"""Weighted mixtures of sources as a pure function of the sample index, and curricula.

`Mixture(pools, probabilities, seed, shuffle)` is an infinite `grain.MapDataset` whose
element k is `(source, record)`: which source sample k comes from is drawn with the
given probabilities from a counter-based stream (blocks of `BLOCK` draws keyed by
seed and block number), and the n-th draw of source j takes record
`pools[j][perm_j,e[n % len]]`, where e = n // len is that source's epoch and perm is a
fresh permutation per (seed, source, epoch). So small sources repeat, each epoch is
reshuffled, and element k depends on k alone: Grain's iterator state (the next index)
is the whole mixture state, slicing `[v::V]` gives each virtual shard (shards.py) its
own samples, and a resume continues exactly.

A probability is the expected share of sampled examples. `probabilities(weights,
mean_tokens, weight_by)` turns source weights into them; under `weight_by=tokens`
a source's weight is its expected share of tokens instead (weight / mean length).

`Staged(datasets, starts)` is a curriculum: it yields batches of `datasets[s]` for
steps in `[starts[s], starts[s+1])`, one batch per step. Its state is the step and
the current stage's iterator state, so a resume mid-stage is exact. A stage's packer
starts empty: examples still open in the previous stage's bins are not carried over.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import grain
import numpy as np

BLOCK = 4096


def probabilities(weights: Sequence[float], mean_tokens: Sequence[float], weight_by: str) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if weight_by == "tokens":
        w = w / np.maximum(np.asarray(mean_tokens, dtype=np.float64), 1.0)
    return w / w.sum()


class Mixture(grain.MapDataset):
    def __init__(self, pools: Sequence[np.ndarray], probs: Sequence[float], seed: int, shuffle: bool = True):
        super().__init__()
        self.pools = [np.asarray(p, dtype=np.int64) for p in pools]
        self.probs = np.asarray(probs, dtype=np.float64)
        live = [j for j, p in enumerate(self.probs) if p > 0 and len(self.pools[j])]
        if not live:
            raise ValueError("a mixture needs a source with a positive weight and examples")
        self._cumulative = np.cumsum(np.where([len(p) > 0 for p in self.pools], self.probs, 0.0))
        self._cumulative /= self._cumulative[-1]
        self.seed, self.shuffle = seed, shuffle
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # block -> (choices, n-th draw of its source)
        self._starts: dict[int, np.ndarray] = {0: np.zeros(len(self.pools), np.int64)}  # draws before block
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"Mixture({len(self.pools)} sources, p={np.round(self.probs, 3).tolist()})"

    def _choices(self, b: int) -> np.ndarray:
        u = np.random.default_rng([self.seed, 0x6D6978, b]).random(BLOCK)
        return np.searchsorted(self._cumulative, u, side="right").clip(0, len(self.pools) - 1)

    def _start(self, b: int) -> np.ndarray:
        """Draws of each source before block b (from the nearest block already known)."""
        known = max(k for k in self._starts if k <= b)
        counts = self._starts[known].copy()
        for k in range(known, b):
            counts += np.bincount(self._choices(k), minlength=len(self.pools))
        self._starts[b] = counts
        return counts

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        if b not in self._blocks:
            choices = self._choices(b)
            start = self._start(b)
            nth = np.empty(BLOCK, np.int64)
            for j in range(len(self.pools)):
                where = np.flatnonzero(choices == j)
                nth[where] = start[j] + np.arange(len(where))
            if len(self._blocks) > 4:  # sequential access needs the current block or two
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[b] = (choices, nth)
            self._starts[b + 1] = start + np.bincount(choices, minlength=len(self.pools))
        return self._blocks[b]

    def _record(self, j: int, n: int) -> int:
        pool = self.pools[j]
        epoch, r = divmod(int(n), len(pool))
        if not self.shuffle:
            return int(pool[r])
        key = (j, epoch)
        if key not in self._perms:
            if len(self._perms) > 2 * len(self.pools):
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([self.seed, 0x7065726D, j, epoch]).permutation(len(pool))
        return int(pool[self._perms[key][r]])

    def __getitem__(self, k):
        if isinstance(k, slice):
            return self.slice(k)
        choices, nth = self._block(k // BLOCK)
        j = int(choices[k % BLOCK])
        return j, self._record(j, nth[k % BLOCK])


class _StagedIterator(grain.DatasetIterator):
    def __init__(self, datasets: Sequence[grain.IterDataset], starts: Sequence[int]):
        super().__init__()
        self._datasets, self._starts = datasets, list(starts)
        self._step, self._stage = 0, 0
        self._it = iter(datasets[0])

    def _stage_at(self, step: int) -> int:
        return int(np.searchsorted(self._starts, step, side="right") - 1)

    def _switch(self, stage: int) -> None:
        if stage != self._stage:
            self._it.close()
            self._stage, self._it = stage, iter(self._datasets[stage])

    def __next__(self):
        self._switch(self._stage_at(self._step))
        batch = next(self._it)
        self._step += 1
        return batch

    def get_state(self) -> dict:
        return {"step": self._step, "stage": self._stage, "inner": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        self._step = int(state["step"])
        self._switch(int(state["stage"]))
        self._it.set_state(state["inner"])

    def close(self) -> None:
        self._it.close()


class Staged(grain.IterDataset):
    def __init__(self, datasets: Sequence[grain.IterDataset], starts: Sequence[int]):
        super().__init__(list(datasets))
        self._datasets, self._starts = list(datasets), list(starts)

    def __iter__(self) -> _StagedIterator:
        return _StagedIterator(self._datasets, self._starts)

    def __str__(self) -> str:
        return f"Staged(starts={self._starts})"
