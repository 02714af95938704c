"""The train examples `build_data` encoded while counting, kept for the stream.

Contract: `Encoded(pools, examples)` with, per source, the kept record indices and their
`Encoder` features in the same order; `Encoded(...)((source, record index))` returns
that record's features (views into one array per source, never copies), equal to what
`Encoder` gives for the record. Memory: 8 bytes a token (int32 id, float32 weight).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Encoded:
    """(source, record index) from the mixture -> that record's features, as `Encoder` made
    them in `build_data`'s counting pass: per source, every kept example's tokens
    (inputs + the last target) and loss weights, concatenated, with offsets."""

    def __init__(self, pools: Sequence[np.ndarray], examples: Sequence[Sequence[dict[str, np.ndarray]]]):
        self.order = [np.argsort(p, kind="stable") for p in pools]  # per source: kept example k of record i
        self.sorted = [np.asarray(p)[o] for p, o in zip(pools, self.order)]
        self.tokens, self.weights, self.offsets = [], [], []
        for features in examples:
            lengths = np.fromiter((len(f["inputs"]) for f in features), np.int64, len(features))
            self.offsets.append(np.concatenate([[0], np.cumsum(lengths + 1)]))
            self.tokens.append(_joined([np.append(f["inputs"], f["targets"][-1:]) for f in features], np.int32))
            self.weights.append(_joined([np.append(0, f["loss_weights"]) for f in features], np.float32))

    def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
        j, i = item
        k = int(self.order[j][np.searchsorted(self.sorted[j], i)])
        start, end = self.offsets[j][k], self.offsets[j][k + 1]
        tokens, weights = self.tokens[j][start:end], self.weights[j][start:end]
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_weights": weights[1:]}


def _joined(arrays: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
