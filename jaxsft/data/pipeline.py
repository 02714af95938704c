"""The Grain graph: sources -> mixture -> encode -> pack -> batch, and `build_data`.

Contract of a batch: a dict of numpy arrays, each `[rows, cfg.max_length]`:
  inputs int32, targets int32      targets[t] = tokens[t+1] of the same example
  loss_weights float32             weight of target t = template weight of token t+1
  segment_ids int32                1, 2, 3, ... per packed example; 0 = padding
  positions int32                  restart at 0 in every segment; 0 in padding
Padding has inputs = targets = tokenizer.pad_id and weight 0.

`build_data` resolves the sources (reading.py), trains or loads the tokenizer, and runs
`Encoder` over every record once to count: bad records, drops and truncations
land in per-source `DataReport`s, a dropped share above `data.max_dropped_fraction`
raises `DataError` before anything trains, and the indices of the records that make
examples are kept. When all train examples together have at most `ENCODED_CACHE_TOKENS`
tokens, their tokens and weights are kept too (`Encoded`), and the stream reads them
instead of encoding every record a second time. The train graph samples those indices:

  per virtual shard v (shards.py): Mixture(seed)[v::V] -> Encoded | (read + parse -> Encoder)
      -> to_iter_dataset -> pack (best_fit: packing.py | first_fit, concat: Grain | none) -> batch(rows / V)
  -> Concat(the shards this process owns) -> thread prefetch | mp_prefetch -> Sharded (state per shard)

and with `data.stages`, one Concat + prefetch per stage behind `mixture.Staged`. Reading and
encoding run in Grain's worker processes under `worker_count > 0`. Every state (mixture
position, packer bins, stage) is in the iterator's `get_state()`, keyed by virtual shard,
which the trainer checkpoints, so a resume yields exactly the batches of an uninterrupted
run, under any number of processes. Close the
iterator when done: Grain's prefetchers print tracebacks if left to teardown.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np

from jaxsft.config import DataConfig
from jaxsft.data.encoded import Encoded
from jaxsft.data.formats import BadRecord, Conversation, DataError
from jaxsft.data.mixture import Mixture, Staged, probabilities
from jaxsft.data.packing import ConcatThenSplit, WindowBestFit
from jaxsft.data.reading import DataReport, Split, count_split, resolve_sources, training_texts
from jaxsft.data.shards import Concat, Sharded, shard_count
from jaxsft.data.templates import BUILTIN, MaskPolicy, Template, get_template
from jaxsft.data.tokenizer import load_or_train

__all__ = ["DataError", "DataReport", "Encoder", "SFTData", "build_data"]

PREFETCH_BATCHES = 2  # a background thread encodes and packs the next batches while the model steps
MIN_PACKING_BINS = 16  # more open bins fill rows better when few rows are asked for
PACK_WINDOW = 4096  # examples packed at once by best_fit (packing.py), at most
MIN_PACK_WINDOW = 256  # ... and at least, when one epoch of a virtual shard is smaller
SHARD_SEED = 1_000_003  # packer seed of virtual shard v: seed + stage + SHARD_SEED * v
# Encoding is Python under the GIL: read threads would only contend with each other.
READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
FEATURES = ("inputs", "targets", "loss_weights")
# Train examples kept encoded by build_data when they total at most this many tokens
# (8 bytes a token: 128 MiB; a Grain worker process gets its own copy).
ENCODED_CACHE_TOKENS = 16 * 2**20


class Encoder:
    """A conversation -> one example's features, or the reason it is dropped.

    Features: `inputs`, `targets`, `loss_weights`, N-1 each for N rendered tokens. An
    overlong example under `overlong=truncate` keeps its start: whole trailing messages
    go first (cut after the last message that still fits and leaves a trained token),
    and only when no such cut exists is it cut inside a turn; `overlong=truncate_at_length`
    always cuts at max_length (rows fill; the last turn kept may be partial). Pickles into Grain's
    worker processes (the template is looked up again there).
    """

    def __init__(self, cfg: DataConfig, tokenizer):
        self.template_name, self.max_length, self.overlong = cfg.template, cfg.max_length, cfg.overlong
        self.policy = MaskPolicy(cfg.loss_on, cfg.train_on_eot, cfg.reasoning, cfg.reasoning_history)
        self.tokenizer = tokenizer
        self._template: Template | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_template": None}

    @property
    def template(self) -> Template:
        if self._template is None:
            self._template = get_template(self.template_name, self.tokenizer)
        return self._template

    def render(self, messages: Conversation) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
        ends: dict[int, int] = {}
        tokens, weights = self.template.render(messages, self.tokenizer, self.policy, ends)
        return tokens, weights, ends

    def _cut(self, messages: Conversation, weights: np.ndarray, ends: dict[int, int]) -> tuple[int, str]:
        """Cut after the last answer that fits and leaves a trained token; else (or under
        `truncate_at_length`) at max_length."""
        limit = self.max_length + 1
        if self.overlong == "truncate_at_length":
            return limit, "at max_length"
        answers = [end for i, end in ends.items() if messages[i].role in ("assistant", "text")]
        for end in sorted(answers, reverse=True):
            if end <= limit and weights[1:end].any():
                return end, "whole turns"
        return limit, "inside a turn"

    def prime(self, conversations: Sequence[Conversation]) -> None:
        """Lets the tokenizer encode these conversations' texts in one batch call ahead of
        `encode` (its library's threads: the counting pass's main cost); `prime([])` forgets."""
        prime = getattr(self.tokenizer, "prime", None)
        if prime is None:
            return
        texts = []
        for messages in conversations:
            try:
                texts += self.template.encoded_texts(messages, self.tokenizer)
            except BadRecord:
                continue  # encode says why
        prime(texts)

    def encode(self, messages: Conversation) -> tuple[dict[str, np.ndarray], str | None] | str:
        """(features, truncation reason or None), or the drop reason."""
        try:
            tokens, weights, ends = self.render(messages)
        except BadRecord as e:
            return e.reason
        truncation = None
        if len(tokens) - 1 > self.max_length:
            if self.overlong == "drop":
                return "overlong"
            cut, truncation = self._cut(messages, weights, ends)
            tokens, weights = tokens[:cut], weights[:cut]
        if not weights[1:].any():
            return "no_trained_tokens"
        return {"inputs": tokens[:-1], "targets": tokens[1:], "loss_weights": weights[1:]}, truncation

    def __call__(self, messages: Conversation | str) -> dict[str, np.ndarray] | str:
        if isinstance(messages, str):
            return messages
        out = self.encode(messages)
        return out if isinstance(out, str) else out[0]


class Lookup:
    """(source, record index) from the mixture -> the record's conversation (or a drop reason)."""

    def __init__(self, splits: Sequence[Split]):
        self.splits = list(splits)

    def __call__(self, item: tuple[int, int]) -> Conversation | str:
        j, i = item
        try:
            return self.splits[j].conversation(i)
        except BadRecord as e:  # counted at build time; only a file changed since could get here
            return e.reason


class Records(grain.MapDataset):
    """Conversations in memory as a Grain source (the eval set). `MapDataset.source(list)`
    would also size every record for its metrics, a tree walk costing nearly as much as
    encoding."""

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
        return self.conversations[i % len(self)]


def is_example(element: dict[str, np.ndarray] | str) -> bool:
    return not isinstance(element, str)  # a string is a drop reason, already counted


def pack_and_batch(
    ds: grain.IterDataset,
    cfg: DataConfig,
    rows: int,
    pad_id: int,
    *,
    seed: int,
    shuffle_bins: bool,
    drop_remainder: bool,
    window: int = PACK_WINDOW,
) -> grain.IterDataset:
    """Batches of `rows` rows of `cfg.max_length`; `packing=none` is one example per row;
    best_fit packs `window` examples at a time."""
    lengths = {k: cfg.max_length for k in FEATURES}
    if cfg.packing == "best_fit":
        packed = WindowBestFit(ds, cfg.max_length, window, pad_id, seed)
    elif cfg.packing == "concat":
        # Examples run on across row ends (the rest opens the next row at position 0). Targets
        # and weights are packed as features of their own: as meta features they would stop
        # the splitting and pad instead. Their segment ids equal the inputs' (equal lengths).
        packed = ConcatThenSplit(ds, lengths)
    else:
        packer = grain.experimental.FirstFitPackIterDataset
        one_per_row = cfg.packing == "none"
        # Targets and weights are meta features too: packed into the same cells as the
        # inputs (equal lengths), without segment ids of their own; the inputs' describe all.
        packed = packer(
            ds,
            length_struct=lengths,
            meta_features=FEATURES[1:],
            padding_struct={"inputs": pad_id, "targets": pad_id, "loss_weights": 0.0},
            num_packing_bins=rows if one_per_row else max(rows, MIN_PACKING_BINS),
            seed=seed,
            shuffle_bins=shuffle_bins,
            max_sequences_per_bin=1 if one_per_row else None,
        )
    return packed.batch(rows, drop_remainder=drop_remainder).map(Batcher(pad_id))


class Batcher:
    """A packed batch -> the batch contract (padding set to pad_id, weight 0)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segment_ids = packed["inputs_segment_ids"].astype(np.int32)
        pad = segment_ids == 0
        out = {k: np.where(pad, self.pad_id, packed[k]).astype(np.int32) for k in FEATURES[:2]}
        out["loss_weights"] = np.where(pad, 0.0, packed["loss_weights"]).astype(np.float32)
        out["segment_ids"] = segment_ids
        out["positions"] = np.where(pad, 0, packed["inputs_positions"]).astype(np.int32)
        return out


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
    """The tokenizer, the sources' splits, the records that make examples, and the counts."""

    cfg: DataConfig
    tokenizer: object
    template: Template
    train: list[Split]
    evals: list[Split]
    pools: list[np.ndarray]  # per source: indices of train records that make examples
    lengths: list[np.ndarray]  # per source: their token counts
    eval_pools: list[np.ndarray]
    report: DataReport  # all train sources together
    eval_report: DataReport
    source_reports: dict[str, DataReport]  # per train source
    encoded: Encoded | None = None  # the train examples' features, when small enough to keep

    @property
    def train_records(self) -> list[Conversation]:
        """Every parseable train conversation, source by source (small data and tests)."""
        return [m for s in self.train for _, m in s.read() if not isinstance(m, BadRecord)]

    @property
    def eval_records(self) -> list[Conversation]:
        return [s.conversation(int(i)) for s, pool in zip(self.evals, self.eval_pools) for i in pool]

    def stage_probabilities(self) -> list[tuple[int, np.ndarray]]:
        """(start step, sampling probability per source) for each stage."""
        names = [s.name for s in self.train]
        stages = self.cfg.stages or ()
        unknown = {n for st in stages for n in st.weights} - set(names)
        if unknown:
            raise DataError(f"data.stages: unknown source names {sorted(unknown)} (sources: {', '.join(names)})")
        weights = [(st.start_step, [st.weights.get(n, 0.0) for n in names]) for st in stages] or [
            (0, [s.weight for s in self.train])
        ]
        means = [float(n.mean()) if len(n) else 0.0 for n in self.lengths]
        out = []
        for start, w in weights:
            usable = [wi if len(p) else 0.0 for wi, p in zip(w, self.pools)]
            if sum(usable) <= 0:
                raise DataError(f"data.stages (step {start}): no source with a positive weight has examples")
            out.append((start, probabilities(usable, means, self.cfg.weight_by)))
        return out

    def _shard(self, ds: grain.MapDataset, rows: int, seed: int, window: int) -> grain.IterDataset:
        if self.encoded is not None:
            it = ds.map(self.encoded).to_iter_dataset(READ_OPTIONS)
        else:
            it = ds.map(Lookup(self.train)).map(Encoder(self.cfg, self.tokenizer)).filter(is_example)
            it = it.to_iter_dataset(READ_OPTIONS)
        return pack_and_batch(
            it, self.cfg, rows, self.tokenizer.pad_id, seed=seed, shuffle_bins=True, drop_remainder=True, window=window
        )

    def pack_window(self, count: int) -> int:
        """best_fit's window per virtual shard: PACK_WINDOW examples, or one epoch of a shard when
        that is fewer (a small dataset's first batch would otherwise wait for many epochs of
        encoding: 2,000 conversations over 8 shards are 16 epochs of a 4,096 window)."""
        epoch = -(-sum(len(p) for p in self.pools) // count)
        return max(MIN_PACK_WINDOW, min(PACK_WINDOW, epoch))

    def _prefetch(self, it: grain.IterDataset) -> grain.IterDataset:
        if self.cfg.worker_count > 0:
            _mark_absl_flags_parsed()
            return it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.worker_count))
        return grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=PREFETCH_BATCHES)

    def train_dataset(self, rows: int, *, seed: int, shards: Sequence[int] | None = None) -> grain.IterDataset:
        """Infinite global batches of `rows` rows, or only the row blocks of the virtual `shards`
        (shards.py: the rows a process feeds its devices), which are the same whatever builds them."""
        count = shard_count(self.cfg.virtual_shards, rows)
        per_shard = rows // count
        shards = list(range(count)) if shards is None else sorted(shards)
        window = self.pack_window(count)
        stages = []
        for k, (start, probs) in enumerate(self.stage_probabilities()):
            mixture = Mixture(self.pools, probs, seed=seed * 1009 + k, shuffle=self.cfg.shuffle)
            blocks = [self._shard(mixture[v::count], per_shard, seed + k + SHARD_SEED * v, window) for v in shards]
            stages.append((start, self._prefetch(Concat(blocks, shards))))
        stream = stages[0][1] if len(stages) == 1 else Staged([d for _, d in stages], [s for s, _ in stages])
        return Sharded(stream, shards, count)

    def eval_batches(self, rows: int, n_batches: int) -> list[dict[str, np.ndarray]]:
        """The first `n_batches` packed batches of the eval examples, in order; the last
        may have padding rows, and fewer come back when the eval set runs out."""
        if self.eval_report.examples == 0:
            return []
        encoder = Encoder(self.cfg, self.tokenizer)
        ds = Records(self.eval_records).map(encoder).filter(is_example).to_iter_dataset(READ_OPTIONS)
        batches = pack_and_batch(
            ds,
            dataclasses.replace(self.cfg, packing="first_fit") if self.cfg.packing == "concat" else self.cfg,
            rows,
            self.tokenizer.pad_id,
            seed=0,
            shuffle_bins=False,
            drop_remainder=False,
        )
        return [_pad_rows(b, rows, self.tokenizer.pad_id) for b in itertools.islice(batches, n_batches)]


def check_dropped(report: DataReport, cfg: DataConfig, split: str) -> None:
    """Raises `DataError` when no example is left or too many were dropped."""
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted({**report.bad_records, **report.dropped}.items()))
    first = f"; first: {report.bad_examples[0]}" if report.bad_examples else ""
    if report.records and report.lost / report.records > cfg.max_dropped_fraction:
        raise DataError(
            f"data: {report.lost} of {report.records} {split} examples "
            f"({100 * report.lost / report.records:.1f}%) dropped ({reasons}), above "
            f"data.max_dropped_fraction={cfg.max_dropped_fraction}{first}"
        )
    if split == "train" and report.examples == 0:
        raise DataError(
            f"data: no train examples left of {report.records} records{f' ({reasons})' if reasons else ''}{first}"
        )


def get_tokenizer(cfg: DataConfig, train: list[Split], cache_dir: Path):
    """The configured tokenizer, or a SentencePiece model trained for the built-in template."""
    if not cfg.tokenizer and cfg.template == "hf":
        raise DataError("data.template=hf needs data.tokenizer: hf:/model/dir (the chat_template comes with it)")
    template = BUILTIN.get(cfg.template)
    specials = template.special_pieces if template else ()
    return load_or_train(cfg, lambda: training_texts(train, template), Path(cache_dir), special_pieces=specials)


def build_data(cfg: DataConfig, *, seed: int, cache_dir: Path) -> SFTData:
    """Reads, checks and counts the configured data, and gets a tokenizer (see the module docstring)."""
    train, evals = resolve_sources(cfg, seed, Path(cache_dir))
    if not any(True for s in train for _, m in s.read() if not isinstance(m, BadRecord)):
        report = DataReport()  # say why before a tokenizer fails to train on nothing
        for split in train:
            count_split(split, None, report, cfg.on_bad_record)
        check_dropped(report, cfg, "train")
    tokenizer = get_tokenizer(cfg, train, cache_dir)
    template = get_template(cfg.template, tokenizer)
    template.check(tokenizer)
    encoder = Encoder(cfg, tokenizer)
    report, eval_report, source_reports = DataReport(), DataReport(), {}
    pools, lengths = [], []
    examples: list[list[dict[str, np.ndarray]]] | None = []
    budget = ENCODED_CACHE_TOKENS  # tokens the cache may still take

    def encode(messages: Conversation):
        nonlocal examples, budget
        out = encoder.encode(messages)
        if examples is not None and not isinstance(out, str):
            budget -= len(out[0]["inputs"]) + 1
            if budget < 0:  # too large to keep: the stream encodes instead
                examples = None
            else:
                examples[-1].append(out[0])
        return out

    for split in train:
        r = source_reports[split.name] = DataReport()
        if examples is not None:
            examples.append([])
        good, n = count_split(split, encode, r, cfg.on_bad_record, prime=encoder.prime)
        pools.append(good)
        lengths.append(n)
        report.add(r)
    check_dropped(report, cfg, "train")
    eval_pools = []
    for split in evals:
        good, _ = count_split(split, encoder.encode, eval_report, cfg.on_bad_record, prime=encoder.prime)
        eval_pools.append(good)
    check_dropped(eval_report, cfg, "eval")
    encoded = Encoded(pools, examples) if examples is not None else None
    return SFTData(
        cfg, tokenizer, template, train, evals, pools, lengths, eval_pools, report, eval_report, source_reports, encoded
    )
