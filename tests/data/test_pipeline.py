"""The Grain graph: the batch contract, packing, drops and counts, determinism, resume."""

import collections
import dataclasses
import json

import numpy as np
import pytest

from jaxsft.config import DataConfig, SourceConfig
from jaxsft.data import pipeline
from jaxsft.data.pipeline import DataError, Encoder, SFTData, build_data

ROWS, LENGTH = 8, 128
KEYS = ("inputs", "targets", "loss_weights", "segment_ids", "positions")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cache) -> SFTData:
    cfg = DataConfig(synthetic_train_examples=600, synthetic_eval_examples=150, max_length=LENGTH)
    return build_data(cfg, seed=0, cache_dir=cache)


def _with(data: SFTData, **changes) -> SFTData:
    return dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, **changes))


def _rendered(data: SFTData, records) -> list[tuple[tuple, tuple]]:
    """(tokens, weights of targets 1..N-1) of each record, from the template alone."""
    out = []
    for messages in records:
        tokens, weights = data.template.render(messages, data.tokenizer)
        out.append((tuple(tokens.tolist()), tuple(weights[1:].tolist())))
    return out


def _epoch(data: SFTData) -> list[dict[str, np.ndarray]]:
    """The train examples of one epoch as the graph yields them: in record order, unpacked."""
    it = iter(_with(data, packing="none", shuffle=False).train_dataset(1, seed=0))
    rows = [{k: b[k][0][b["segment_ids"][0] > 0] for k in KEYS[:3]} for b in _take(it, data.report.examples + 1)]
    it.close()
    assert all(np.array_equal(rows[-1][k], rows[0][k]) for k in KEYS[:3]), "an epoch is the counted examples"
    return rows[:-1]


def _segments(batch, pad_id: int) -> list[tuple[tuple, tuple]]:
    """Checks one batch against the contract; returns its examples as (tokens, weights)."""
    assert set(batch) == set(KEYS)
    for k in KEYS:
        assert batch[k].shape == (ROWS, LENGTH) and batch[k].dtype == (np.float32 if k == "loss_weights" else np.int32)
    found = []
    for r in range(ROWS):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        inputs, targets, weights = batch["inputs"][r], batch["targets"][r], batch["loss_weights"][r]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all(), "padding only after the segments"
        pad = slice(used, None)
        assert (inputs[pad] == pad_id).all() and (targets[pad] == pad_id).all()
        assert (weights[pad] == 0).all() and (pos[pad] == 0).all()
        ids = seg[:used]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and (used == 0 or ids[0] == 1)
        for s in range(1, int(ids.max(initial=0)) + 1):
            cols = np.flatnonzero(seg == s)
            assert (pos[cols] == np.arange(len(cols))).all()
            assert (targets[cols[:-1]] == inputs[cols[1:]]).all()
            found.append((tuple(inputs[cols].tolist()) + (int(targets[cols[-1]]),), tuple(weights[cols].tolist())))
    return found


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in KEYS)


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "none"])
def test_train_batches_keep_the_contract(data, packing):
    known = dict(_rendered(data, data.train_records))
    it = iter(_with(data, packing=packing).train_dataset(ROWS, seed=1))
    segments = [s for b in _take(it, 4) for s in _segments(b, data.tokenizer.pad_id)]
    it.close()
    for tokens, weights in segments:
        assert known[tokens] == weights  # every segment is one whole example, weights and all
    per_row = len(segments) / (4 * ROWS)
    assert per_row == 1 if packing == "none" else per_row > 1.5


@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "none"])
def test_packing_loses_no_example_and_no_weight(data, packing):
    variant = _with(data, packing=packing)
    batches = variant.eval_batches(ROWS, n_batches=1000)  # the whole finite set
    segments = [s for b in batches for s in _segments(b, data.tokenizer.pad_id)]
    unpacked = _rendered(data, data.eval_records)
    assert collections.Counter(t for t, _ in segments) == collections.Counter(t for t, _ in unpacked)
    total = sum(float(b["loss_weights"].sum()) for b in batches)
    assert total == sum(sum(w) for _, w in unpacked) == data.eval_report.trained_tokens
    assert len(batches) > 2 and _equal(variant.eval_batches(ROWS, 2), batches[:2])


def test_report_counts_the_synthetic_data(data):
    r = data.report
    assert r.records == r.examples == 600 and r.bad_records == {} and r.dropped == {} and r.truncated == 0
    rendered = _rendered(data, data.train_records)
    lengths = np.array([len(t) for t, _ in rendered])
    assert r.tokens == int((lengths - 1).sum()) and 20 < lengths.mean() < 80
    assert r.trained_tokens == sum(int(np.count_nonzero(w)) for _, w in rendered)
    assert r.summary_lines()[0] == (
        f"600 records -> 600 examples, {r.tokens} tokens ({r.trained_tokens} trained), 0 truncated"
    )
    assert data.eval_report.examples == 150


@pytest.mark.parametrize(
    "packing",
    ["first_fit", pytest.param("best_fit", marks=pytest.mark.slow), pytest.param("concat", marks=pytest.mark.slow)],
)
def test_same_seed_same_batches_and_resume(data, cache, packing):
    data = _with(data, packing=packing)
    rebuilt = build_data(data.cfg, seed=0, cache_dir=cache)  # cached tokenizer, counted again
    first, again = iter(data.train_dataset(ROWS, seed=3)), iter(rebuilt.train_dataset(ROWS, seed=3))
    reference = _take(first, 30)  # ~3 epochs of 600 examples: crosses epoch boundaries
    assert _equal(reference, _take(again, 30))
    other = iter(data.train_dataset(ROWS, seed=4))
    assert not _equal(reference[:2], _take(other, 2))
    for it in (first, again, other):
        it.close()
    for stop in (0, 7, 13):
        stopped = iter(data.train_dataset(ROWS, seed=3))
        _take(stopped, stop)
        state = json.loads(json.dumps(stopped.get_state()))  # through JSON, as Grain checkpoints it
        stopped.close()
        resumed = iter(data.train_dataset(ROWS, seed=3))
        resumed.set_state(state)
        assert _equal(_take(resumed, 30 - stop), reference[stop:])
        resumed.close()


def _write_jsonl(path, lines) -> str:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines))
    return str(path)


def _qa(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def _file_data(tmp_path, cache, train_lines, **cfg) -> SFTData:
    train = _write_jsonl(tmp_path / "train.jsonl", train_lines)
    evals = _write_jsonl(tmp_path / "eval.jsonl", [_qa("Say 1000", "1000")])
    return build_data(
        DataConfig(train_files=(train,), eval_files=(evals,), max_length=32, **cfg), seed=0, cache_dir=cache
    )


def test_virtual_shards_read_disjoint_samples(tmp_path, cache):
    data = _file_data(
        tmp_path, cache, [_qa(f"Say {i}", str(i)) for i in range(40)], packing="none", shuffle=False, virtual_shards=2
    )
    it = iter(data.train_dataset(2, seed=5))  # row 0 from shard 0, row 1 from shard 1
    batches = _take(it, 20)
    it.close()
    seen = [[data.tokenizer.decode(b["inputs"][r][b["segment_ids"][r] > 0]) for b in batches] for r in range(2)]
    assert len(set(seen[0])) == len(set(seen[1])) == 20 and set(seen[0]).isdisjoint(seen[1])


BAD_LINES = [
    b"{not json",
    {"msgs": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    _qa("q", ""),
    b'{"messages": [{"role": "user", "content": "\xff"}]}',
]


def test_bad_lines_are_counted_and_reported(tmp_path, cache):
    good = [_qa(f"Say {i}", str(i)) for i in range(30)]
    lines = good[:1] + BAD_LINES + good[1:]  # bad ones on lines 2-6
    data = _file_data(tmp_path, cache, lines, max_dropped_fraction=0.2)
    r = data.report
    assert r.records == 35 and r.examples == len(data.train_records) == 30
    assert r.bad_records == {
        "invalid JSON": 1,
        "missing messages": 1,
        "unknown role": 1,
        "empty assistant content": 1,
        "invalid UTF-8": 1,
    }
    path = tmp_path / "train.jsonl"
    assert [b.split(" (")[0] for b in r.bad_examples] == [
        f"{path}:2: invalid JSON",
        f"{path}:3: missing messages",
        f"{path}:4: unknown role",
        f"{path}:5: empty assistant content",
        f"{path}:6: invalid UTF-8",
    ]
    assert r.summary_lines()[1] == (
        "5 dropped: empty assistant content: 1, invalid JSON: 1, invalid UTF-8: 1, missing messages: 1, unknown role: 1"
    )
    trained = {data.tokenizer.decode(e["targets"][e["loss_weights"] > 0][:-1]) for e in _epoch(data)}
    assert trained == {str(i) for i in range(30)}


def test_too_many_drops_fail_with_one_clear_line(tmp_path, cache):
    lines = [_qa(f"Say {i}", str(i)) for i in range(30)] + BAD_LINES
    with pytest.raises(DataError) as e:
        _file_data(tmp_path, cache, lines)
    assert str(e.value) == (
        "data: 5 of 35 train examples (14.3%) dropped (empty assistant content: 1, invalid JSON: 1, "
        "invalid UTF-8: 1, missing messages: 1, unknown role: 1), above data.max_dropped_fraction=0.05; "
        f"first: {tmp_path / 'train.jsonl'}:31: invalid JSON (Expecting property name enclosed in double quotes "
        "at column 2)"
    )
    with pytest.raises(DataError, match=r"^data: no train examples left of 5 records"):
        _file_data(tmp_path, cache, BAD_LINES, max_dropped_fraction=1.0)


def _overlong_lines():
    words = " ".join(["apple"] * 60)
    return (
        [_qa(f"Say {i}", str(i)) for i in range(20)]
        + [_qa(f"Repeat {words}", "ok") for _ in range(10)]  # answer starts past max_length
        + [_qa("Repeat", words) for _ in range(10)]
    )  # answer cut by max_length


def test_overlong_examples_truncate_or_drop(tmp_path, cache):
    data = _file_data(tmp_path, cache, _overlong_lines(), max_dropped_fraction=0.5)
    r = data.report
    assert r.dropped == {"no_trained_tokens": 10} and r.truncated == 10 and r.examples == 30
    epoch = _epoch(data)  # the graph drops and truncates what the count did
    lengths = [len(e["inputs"]) for e in epoch]
    assert max(lengths) == 32 and lengths.count(32) >= 10  # N tokens give N-1 = max_length targets
    assert sum(lengths) == r.tokens and sum(float(e["loss_weights"].sum()) for e in epoch) == r.trained_tokens
    assert sum(1 for b in r.bad_examples if b.endswith(": no_trained_tokens")) == 10

    dropped = _file_data(tmp_path, cache, _overlong_lines(), max_dropped_fraction=0.5, overlong="drop")
    assert dropped.report.dropped == {"overlong": 20} and dropped.report.truncated == 0
    assert dropped.report.examples == len(_epoch(dropped)) == 20
    with pytest.raises(DataError, match=r"^data: 20 of 40 train examples \(50\.0%\) dropped \(overlong: 20\)"):
        _file_data(tmp_path, cache, _overlong_lines(), overlong="drop")


def test_truncate_at_length_keeps_exactly_the_first_max_length_tokens(tmp_path, cache):
    """`truncate` drops a second answer that overflows; `truncate_at_length` keeps its start."""
    words = " ".join(["apple"] * 60)
    lines = [{"messages": [*_qa(f"Say {i}", str(i))["messages"], *_qa("Repeat", words)["messages"]]} for i in range(10)]
    turns = _file_data(tmp_path, cache, lines)
    exact = _file_data(tmp_path, cache, lines, overlong="truncate_at_length")
    assert turns.report.truncations == {"whole turns": 10}
    assert exact.report.truncations == {"at max_length": 10} and exact.report.examples == 10
    for whole, cut in zip(_epoch(turns), _epoch(exact)):
        n = len(whole["inputs"])
        assert n < 32 and len(cut["inputs"]) == 32  # N tokens give N-1 = max_length targets
        for k in KEYS[:3]:  # the same start, then the second exchange up to the row's end
            np.testing.assert_array_equal(cut[k][:n], whole[k])
        assert cut["loss_weights"][n:].sum() > 0  # the second answer's first tokens train
        assert "apple" in exact.tokenizer.decode(cut["targets"][cut["loss_weights"] > 0])
    # Reference: the same conversations encoded whole (no cut), their first 32 positions.
    whole_encoder = Encoder(dataclasses.replace(exact.cfg, max_length=4096), exact.tokenizer)
    for messages, cut in zip(exact.train_records, _epoch(exact)):
        full, truncation = whole_encoder.encode(messages)
        assert truncation is None and len(full["inputs"]) > 32
        for k in KEYS[:3]:
            np.testing.assert_array_equal(cut[k], full[k][:32])
    assert exact.report.trained_tokens > turns.report.trained_tokens


def test_train_files_without_eval_files_hold_out_two_percent(tmp_path, cache):
    train = _write_jsonl(tmp_path / "t.jsonl", [_qa(f"Say {i}", str(i)) for i in range(100)])
    data = build_data(DataConfig(train_files=(train,), max_length=32), seed=0, cache_dir=cache)
    assert (data.report.records, data.eval_report.records) == (98, 2)
    batches = _with(data, packing="none").eval_batches(1, n_batches=10)  # all there are
    held = {data.tokenizer.decode(b["targets"][0][b["loss_weights"][0] > 0][:-1]) for b in batches}
    assert held == {"0", "50"}


def test_iterator_state_round_trips_through_orbax(data, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    it = iter(data.train_dataset(ROWS, seed=2))
    _take(it, 3)
    manager = ocp.CheckpointManager(
        tmp_path / "ckpt", options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    )
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    expected = _take(it, 5)
    restored = iter(data.train_dataset(ROWS, seed=2))
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert _equal(_take(restored, 5), expected)
    it.close()
    restored.close()


def test_worker_processes_give_the_same_batches(data):
    # One worker reads the whole (unsliced) dataset: the same batches as in-process,
    # and its state resumes like the in-process iterator's.
    reference = iter(data.train_dataset(ROWS, seed=6))
    expected = _take(reference, 6)
    reference.close()
    workers = _with(data, worker_count=1)
    it = iter(workers.train_dataset(ROWS, seed=6))
    assert _equal(_take(it, 3), expected[:3])
    state = it.get_state()
    it.close()
    resumed = iter(workers.train_dataset(ROWS, seed=6))
    resumed.set_state(state)
    assert _equal(_take(resumed, 3), expected[3:])
    resumed.close()


def test_concat_fills_every_row_with_the_example_stream(data):
    # One virtual shard: one example stream (with V, each row block runs on its own stream).
    it = iter(_with(data, packing="concat", shuffle=False, virtual_shards=1).train_dataset(ROWS, seed=0))
    batches = _take(it, 3)
    it.close()
    assert all((b["segment_ids"] > 0).all() for b in batches)  # no padding at all
    flat = {k: np.concatenate([b[k].reshape(-1) for b in batches]) for k in KEYS[:3]}
    epoch = _epoch(data)
    for k in KEYS[:3]:
        np.testing.assert_array_equal(flat[k], np.concatenate([e[k] for e in epoch])[: len(flat[k])])
    for b in batches:
        for r in range(ROWS):
            starts = np.flatnonzero(np.diff(np.concatenate([[0], b["segment_ids"][r]])))
            assert (b["positions"][r][starts] == 0).all()
            assert (np.diff(b["positions"][r]) == 1).sum() == LENGTH - len(starts)


@pytest.mark.parametrize("packing", ["best_fit", "none"])
def test_kept_encodings_give_the_batches_of_encoding_in_the_stream(tmp_path, cache, monkeypatch, packing):
    # Two sources (one with bad lines, so pools skip record indices), weighted and shuffled.
    lines = [_qa(f"Say {i}", str(i)) for i in range(30)]
    sources = [
        SourceConfig(name="a", path=_write_jsonl(tmp_path / "a.jsonl", lines[:12] + BAD_LINES[:2] + lines[12:])),
        SourceConfig(
            name="b", path=_write_jsonl(tmp_path / "b.jsonl", [_qa(f"Echo {w}", w) for w in "xyzuvw"]), weight=2
        ),
    ]
    cfg = DataConfig(sources=tuple(sources), max_length=32, packing=packing, max_dropped_fraction=0.5)
    kept = build_data(cfg, seed=0, cache_dir=cache)
    monkeypatch.setattr(pipeline, "ENCODED_CACHE_TOKENS", 100)  # less than the data: encoded in the stream
    streamed = build_data(cfg, seed=0, cache_dir=cache)
    assert kept.encoded is not None and streamed.encoded is None
    a, b = iter(kept.train_dataset(ROWS, seed=1)), iter(streamed.train_dataset(ROWS, seed=1))
    assert _equal(_take(a, 12), _take(b, 12))  # several epochs of 42 examples
    a.close()
    b.close()
