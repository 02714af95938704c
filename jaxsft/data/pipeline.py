"""The Grain graph: records -> shuffled, sharded, encoded, packed batches.

Contract of a batch: a dict of numpy arrays, each `[rows, cfg.max_length]`:
  inputs int32, targets int32      targets[t] = tokens[t+1] of the same example
  loss_weights float32             weight of target t = template weight of token t+1
  segment_ids int32                1, 2, 3, ... per packed example; 0 = padding
  positions int32                  restart at 0 in every segment; 0 in padding
Padding has inputs = targets = tokenizer.pad_id and weight 0.

`build_data` reads the records, trains or loads the tokenizer, and runs `Encoder` over
every record once, only to count: bad records, drops ("no_trained_tokens", "overlong"
under `overlong=drop`) and truncations land in `DataReport`, and a dropped share above
`data.max_dropped_fraction` raises `DataError` before anything trains. No token is
kept: the source of the Grain graph is the parsed conversations, and encoding is a
step of the graph, so it runs in Grain's worker processes under `worker_count > 0`:

  conversations -> shuffle(seed) -> [rank::ranks] -> repeat() -> map(Encoder)
    -> filter(dropped) -> to_iter_dataset -> first/best-fit pack -> batch(rows)
    -> to_batch -> thread prefetch | mp_prefetch

`shuffle` before `repeat` reshuffles every epoch; sharding the shuffled records by
process gives each process a disjoint part of every epoch (equal in records; drops
may leave the shards a few examples apart). The same `Encoder` counts and encodes,
so the graph drops exactly what the report counted. Every epoch re-encodes: a 16x256
batch of the demo data costs about 10 ms of one CPU core, roughly a third encoding and
a third packing (bench/data_throughput.py). The iterator's `get_state()`/`set_state()`
(and Grain's Orbax handlers) resume it exactly. Close the iterator when done: Grain's
prefetchers print tracebacks if left to teardown.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Sequence

import grain
import numpy as np

from jaxsft.config import DataConfig
from jaxsft.data import synthetic
from jaxsft.data.formats import Conversation, parse_messages
from jaxsft.data.sources import DataError, Where, load_jsonl
from jaxsft.data.templates import ChatML, get_template
from jaxsft.data.tokenizer import SentencePieceTokenizer, load_or_train

__all__ = ["DataError", "DataReport", "Encoder", "SFTData", "build_data"]

PREFETCH_BATCHES = 2  # a background thread encodes and packs the next batches while the model steps
MIN_PACKING_BINS = 16  # more open bins fill rows better when few rows are asked for
EVAL_HOLDOUT_EVERY = 50  # without eval_files, every 50th train record (2%) is eval
MAX_REPORTED = 10
# Encoding is Python under the GIL: read threads would only contend with each other.
# Overlap with the train step comes from the batch prefetch thread (or worker processes).
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
FEATURES = ("inputs", "targets", "loss_weights")


@dataclasses.dataclass
class DataReport:
    """What one split's data turned into; every number a user may want to check."""

    records: int = 0  # records read, bad ones included
    bad_records: dict[str, int] = dataclasses.field(default_factory=dict)  # reason -> count
    bad_examples: list[str] = dataclasses.field(default_factory=list)  # first "file:line: reason" (bad or dropped)
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)  # "no_trained_tokens", "overlong"
    truncated: int = 0
    examples: int = 0  # examples that train
    tokens: int = 0  # (input, target) positions of those examples
    trained_tokens: int = 0  # positions with a non-zero loss weight

    def note(self, where: object) -> None:
        if len(self.bad_examples) < MAX_REPORTED:
            self.bad_examples.append(str(where))

    @property
    def lost(self) -> int:
        return sum(self.bad_records.values()) + sum(self.dropped.values())

    def summary_lines(self) -> list[str]:
        lines = [f"{self.records} records -> {self.examples} examples, {self.tokens} tokens "
                 f"({self.trained_tokens} trained), {self.truncated} truncated"]
        if self.lost:
            reasons = {**self.bad_records, **self.dropped}
            lines.append(f"{self.lost} dropped: " + ", ".join(f"{r}: {n}" for r, n in sorted(reasons.items())))
            lines += [f"  {b}" for b in self.bad_examples]
        return lines


class Encoder:
    """A conversation -> one example's features, or the reason it is dropped.

    Features: `inputs`, `targets`, `loss_weights`, N-1 each for N rendered tokens (the
    batch contract before packing). Overlong examples keep their start, the prompt that
    the kept answer tokens are conditioned on, or drop under `overlong=drop`. Holds the
    template by name (its id cache holds weak references), so it pickles into Grain's
    worker processes.
    """

    def __init__(self, cfg: DataConfig, tokenizer: SentencePieceTokenizer):
        self.template_name, self.max_length, self.overlong = cfg.template, cfg.max_length, cfg.overlong
        self.tokenizer = tokenizer

    def encode(self, messages: Conversation) -> tuple[dict[str, np.ndarray], bool] | str:
        """(features, truncated), or the drop reason."""
        tokens, weights = get_template(self.template_name).render(messages, self.tokenizer)
        truncated = len(tokens) - 1 > self.max_length
        if truncated:
            if self.overlong == "drop":
                return "overlong"
            tokens, weights = tokens[:self.max_length + 1], weights[:self.max_length + 1]
        if not weights[1:].any():
            return "no_trained_tokens"
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_weights": weights[1:]}, truncated

    def __call__(self, messages: Conversation) -> dict[str, np.ndarray] | str:
        out = self.encode(messages)
        return out if isinstance(out, str) else out[0]


class Records(grain.MapDataset):
    """Conversations as a Grain source. `MapDataset.source(list)` would also size every
    record for its metrics, a tree walk over the messages that cost nearly as much as
    encoding (a 16x256 batch took 11.4 ms with it, 9 ms without)."""

    def __init__(self, conversations: Sequence[Conversation]):
        super().__init__()
        self.conversations = conversations

    def __len__(self) -> int:
        return len(self.conversations)

    def __str__(self) -> str:
        return f"Records({len(self)} conversations)"

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        return self.conversations[i % len(self)]  # Grain indexes past the end for later epochs


def is_example(element: dict[str, np.ndarray] | str) -> bool:
    return not isinstance(element, str)  # a string is a drop reason, already counted


def _count(records: Sequence[tuple[Conversation, Where]], encoder: Encoder, report: DataReport) -> None:
    for messages, where in records:
        out = encoder.encode(messages)
        if isinstance(out, str):
            report.dropped[out] = report.dropped.get(out, 0) + 1
            report.note(f"{where}: {out}")
            continue
        features, truncated = out
        report.examples += 1
        report.truncated += truncated
        report.tokens += len(features["inputs"])
        report.trained_tokens += int(np.count_nonzero(features["loss_weights"]))


def _synthetic(n: int, seed: int, split: str) -> list[tuple[Conversation, Where]]:
    return [(parse_messages(r), Where(f"synthetic:{split}", i + 1))
            for i, r in enumerate(synthetic.generate(n, seed, split))]


def _from_files(paths: Sequence[str], report: DataReport) -> list[tuple[Conversation, Where]]:
    good, bad = load_jsonl(paths)
    report.records = len(good) + len(bad)
    for line in bad:
        report.bad_records[line.reason] = report.bad_records.get(line.reason, 0) + 1
        report.note(line)
    return good


def _read_records(cfg: DataConfig, seed: int, train: DataReport, evals: DataReport):
    """Train and eval records with locations; bad lines are counted in the reports."""
    if cfg.train_files:
        train_records = _from_files(cfg.train_files, train)
    else:
        train_records = _synthetic(cfg.synthetic_train_examples, seed, "train")
        train.records = len(train_records)
    if cfg.eval_files:
        eval_records = _from_files(cfg.eval_files, evals)
    elif cfg.train_files:
        # Hold out by position: deterministic, independent of the seed, about 2%.
        held = set(range(0, len(train_records), EVAL_HOLDOUT_EVERY)) if len(train_records) > 1 else set()
        eval_records = [r for i, r in enumerate(train_records) if i in held]
        train_records = [r for i, r in enumerate(train_records) if i not in held]
        train.records -= len(eval_records)
        evals.records = len(eval_records)
    else:
        eval_records = _synthetic(cfg.synthetic_eval_examples, seed, "eval")
        evals.records = len(eval_records)
    return train_records, eval_records


def check_dropped(report: DataReport, cfg: DataConfig, split: str) -> None:
    """Raises `DataError` when no example is left or too many were dropped."""
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted({**report.bad_records, **report.dropped}.items()))
    first = f"; first: {report.bad_examples[0]}" if report.bad_examples else ""
    if report.records and report.lost / report.records > cfg.max_dropped_fraction:
        raise DataError(f"data: {report.lost} of {report.records} {split} examples "
                        f"({100 * report.lost / report.records:.1f}%) dropped ({reasons}), above "
                        f"data.max_dropped_fraction={cfg.max_dropped_fraction}{first}")
    if split == "train" and report.examples == 0:
        raise DataError(f"data: no train examples left of {report.records} records"
                        f"{f' ({reasons})' if reasons else ''}{first}")


def pack_and_batch(ds: grain.IterDataset, cfg: DataConfig, rows: int, pad_id: int, *, seed: int,
                   shuffle_bins: bool, drop_remainder: bool) -> grain.IterDataset:
    """Batches of `rows` rows of `cfg.max_length`; `packing=none` is one example per row."""
    packer = (grain.experimental.BestFitPackIterDataset if cfg.packing == "best_fit"
              else grain.experimental.FirstFitPackIterDataset)
    one_per_row = cfg.packing == "none"
    # Targets and weights are listed as meta features too: packed into the same cells as
    # the inputs (equal lengths), without segment ids of their own; the inputs' describe all.
    packed = packer(ds, length_struct={k: cfg.max_length for k in FEATURES}, meta_features=FEATURES[1:],
                    padding_struct={"inputs": pad_id, "targets": pad_id, "loss_weights": 0.0},
                    num_packing_bins=rows if one_per_row else max(rows, MIN_PACKING_BINS),
                    seed=seed, shuffle_bins=shuffle_bins, max_sequences_per_bin=1 if one_per_row else None)
    return packed.batch(rows, drop_remainder=drop_remainder).map(to_batch)


def to_batch(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed batch -> the batch contract (the packer already padded with pad_id and 0)."""
    return {**{k: packed[k] for k in FEATURES},
            "segment_ids": packed["inputs_segment_ids"], "positions": packed["inputs_positions"]}


def _pad_rows(batch: dict[str, np.ndarray], rows: int, pad_id: int) -> dict[str, np.ndarray]:
    missing = rows - len(batch["inputs"])
    if missing == 0:
        return batch
    fill = {"inputs": pad_id, "targets": pad_id}
    return {k: np.concatenate([v, np.full((missing, v.shape[1]), fill.get(k, 0), v.dtype)]) for k, v in batch.items()}


def _mark_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; outside `absl.app.run` that raises
    # UnparsedFlagAccessError (TRAPS.md). Marking parsed keeps every flag's default.
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass
class SFTData:
    """The tokenizer, the train and eval conversations, and what counting them found."""

    cfg: DataConfig
    tokenizer: SentencePieceTokenizer
    template: ChatML
    train_records: list[Conversation]  # every parsed conversation; the graph drops what the report counted
    eval_records: list[Conversation]
    report: DataReport
    eval_report: DataReport

    def _encoded(self, ds: grain.MapDataset) -> grain.IterDataset:
        return ds.map(Encoder(self.cfg, self.tokenizer)).filter(is_example).to_iter_dataset(READ_OPTIONS)

    def train_dataset(self, rows: int, *, seed: int, process_index: int = 0,
                      process_count: int = 1) -> grain.IterDataset:
        """Infinite batches of `rows` rows from this process's shard of every epoch."""
        ds = Records(self.train_records)
        if self.cfg.shuffle:
            ds = ds.shuffle(seed)
        # Equal shards: the few records beyond a multiple of process_count sit out this
        # epoch (a different few each epoch, since each epoch is reshuffled).
        per_process = len(ds) // process_count
        if per_process == 0:
            raise DataError(f"data: {len(ds)} train records cannot feed {process_count} processes")
        ds = ds[:per_process * process_count][process_index::process_count].repeat()
        it = pack_and_batch(self._encoded(ds), self.cfg, rows, self.tokenizer.pad_id,
                            seed=seed, shuffle_bins=True, drop_remainder=True)
        if self.cfg.worker_count > 0:
            _mark_absl_flags_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.worker_count))
        else:
            it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=PREFETCH_BATCHES)
        return it

    def eval_batches(self, rows: int, n_batches: int) -> list[dict[str, np.ndarray]]:
        """The first `n_batches` packed batches of the eval examples, in order; the last
        may have padding rows, and fewer come back when the eval set runs out."""
        if self.eval_report.examples == 0:
            return []
        batches = pack_and_batch(self._encoded(Records(self.eval_records)), self.cfg, rows,
                                 self.tokenizer.pad_id, seed=0, shuffle_bins=False, drop_remainder=False)
        return [_pad_rows(b, rows, self.tokenizer.pad_id) for b in itertools.islice(batches, n_batches)]


def build_data(cfg: DataConfig, *, seed: int, cache_dir: Path) -> SFTData:
    """Reads, checks and counts the configured data, and gets a tokenizer (see the module docstring)."""
    template = get_template(cfg.template)
    report, eval_report = DataReport(), DataReport()
    train_records, eval_records = _read_records(cfg, seed, report, eval_report)
    if not train_records:  # say why before a tokenizer fails to train on nothing
        check_dropped(report, cfg, "train")
    tokenizer = load_or_train(
        cfg, lambda: (t for messages, _ in train_records for t in template.text_segments(messages)),
        Path(cache_dir), special_pieces=template.special_pieces)
    template.check(tokenizer)
    encoder = Encoder(cfg, tokenizer)
    _count(train_records, encoder, report)
    check_dropped(report, cfg, "train")
    _count(eval_records, encoder, eval_report)
    check_dropped(eval_report, cfg, "eval")
    return SFTData(cfg, tokenizer, template, [m for m, _ in train_records], [m for m, _ in eval_records],
                   report, eval_report)
