"""Every source type read from a file the test writes; mixtures, curricula, exact resume."""

import gzip
import json

import numpy as np
import pytest

from jaxsft.config import DataConfig, SourceConfig, StageConfig
from jaxsft.data import sources as sources_mod
from jaxsft.data.mixture import Mixture, probabilities
from jaxsft.data.pipeline import DataError, build_data
from jaxsft.data.sources import JsonlSource

ROWS, LENGTH = 4, 64


def _qa(q, a):
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def _alpaca(i, tag):
    return {"instruction": f"Say {tag} {i}", "output": f"{tag}{i}"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _answers(data, batches) -> list[str]:
    """The trained text of every packed segment, end-of-turn dropped."""
    eot = data.template.end_of_turn_id(data.tokenizer)
    out = []
    for b in batches:
        for r in range(len(b["inputs"])):
            for s in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
                cols = np.flatnonzero(b["segment_ids"][r] == s)
                trained = b["targets"][r][cols][b["loss_weights"][r][cols] > 0]
                out.append(data.tokenizer.decode([t for t in trained if t != eot]))
    return out


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_jsonl_gzip_glob_and_a_cached_index(tmp_path, monkeypatch):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(_qa(f"q{i}", f"a{i}")) + "\n" for i in range(5)))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(_qa(f"q{i}", f"b{i}")) for i in range(3)) + "\n\n")
    calls = []
    real = sources_mod._line_spans
    monkeypatch.setattr(sources_mod, "_line_spans", lambda data: calls.append(1) or real(data))
    source = JsonlSource([str(tmp_path / "*.jsonl*")], tmp_path / "cache")
    assert len(source) == 8 and len(calls) == 2
    assert source.record(6)["messages"][1]["content"] == "b1" and str(source.where(6)) == f"{tmp_path}/b.jsonl.gz:2"
    again = JsonlSource([str(tmp_path / "*.jsonl*")], tmp_path / "cache")
    assert len(calls) == 2 and again.record(7) == source.record(7)  # the index came from the cache
    assert len(list((tmp_path / "cache" / "index").iterdir())) == 2


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _write_arrayrecord(path, rows):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for r in rows:
        writer.write(json.dumps(r).encode())
    writer.close()


def _build_tfds(data_dir):
    tfds = pytest.importorskip("tensorflow_datasets")

    class TinyChats(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"instruction": tfds.features.Text(), "output": tfds.features.Text()}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(20), "validation": self._generate_examples(3, 100)}

        def _generate_examples(self, n, start=0):
            for i in range(start, start + n):
                yield i, _alpaca(i, "t")

    TinyChats(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_every_source_type_in_one_mixture(tmp_path, cache):
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(_alpaca(i, "j")) + "\n" for i in range(20)))
    _write_parquet(tmp_path / "chats.parquet", [{"q": f"Say p {i}", "a": f"p{i}"} for i in range(20)])
    _write_arrayrecord(tmp_path / "chats.arrayrecord", [_alpaca(i, "r") for i in range(20)])
    _build_tfds(tmp_path / "tfds")
    cfg = DataConfig(
        max_length=LENGTH,
        sources=(
            SourceConfig(path=str(tmp_path / "chats.jsonl"), format="alpaca", eval_fraction=0.1),
            SourceConfig(
                path=str(tmp_path / "chats.parquet"), format="alpaca", columns={"instruction": "q", "output": "a"}
            ),
            SourceConfig(path=str(tmp_path / "chats.arrayrecord"), format="alpaca"),
            SourceConfig(
                path="tiny_chats",
                type="tfds",
                data_dir=str(tmp_path / "tfds"),
                format="alpaca",
                eval_split="validation",
            ),
            SourceConfig(type="synthetic", examples=50, eval_examples=4),
        ),
    )
    data = build_data(cfg, seed=0, cache_dir=cache)
    reports = data.source_reports
    assert list(reports) == ["chats.jsonl", "chats.parquet", "chats.arrayrecord", "tiny_chats", "synthetic"]
    assert [r.examples for r in reports.values()] == [18, 20, 20, 20, 50]
    assert data.eval_report.examples == 2 + 3 + 4  # jsonl holdout, tfds validation, synthetic eval
    it = iter(data.train_dataset(ROWS, seed=0))
    answers = _answers(data, _take(it, 40))
    it.close()
    for tag in ("j", "p", "r", "t"):
        assert any(a.startswith(tag) and a[1:].isdigit() for a in answers), tag
    assert {a for a in answers if a.startswith("t") and a[1:].isdigit()} <= {f"t{i}" for i in range(20)}


def test_mixture_shares_are_the_weights():
    pools = [np.arange(10), np.arange(1000), np.arange(3)]
    probs = probabilities([1, 2, 1], [10, 10, 10], "examples")
    mix = Mixture(pools, probs, seed=0)
    draws = [mix[k] for k in range(20000)]
    counts = np.bincount([j for j, _ in draws], minlength=3)
    assert np.allclose(counts / 20000, [0.25, 0.5, 0.25], atol=0.015)
    small = [i for j, i in draws if j == 2]
    assert sorted(small[:3]) == [0, 1, 2] and sorted(small[3:6]) == [0, 1, 2]  # every epoch is whole
    assert mix[12345] == Mixture(pools, probs, seed=0)[12345]  # a pure function of the index
    assert np.allclose(probabilities([1, 1], [10, 30], "tokens"), [0.75, 0.25])  # equal token shares


def _two_sources(tmp_path, stages=(), **cfg):
    for tag in ("a", "b"):
        (tmp_path / f"{tag}.jsonl").write_text(
            "".join(json.dumps(_qa(f"Say {tag}{i}", f"{tag}{i}")) + "\n" for i in range(30))
        )
    return DataConfig(
        max_length=LENGTH,
        stages=stages,
        **cfg,
        sources=(
            SourceConfig(path=str(tmp_path / "a.jsonl"), name="a"),
            SourceConfig(path=str(tmp_path / "b.jsonl"), name="b"),
        ),
    )


def test_stages_switch_at_steps_and_resume_exactly(tmp_path, cache):
    stages = (StageConfig(0, {"a": 1.0}), StageConfig(4, {"b": 1.0}), StageConfig(8, {"a": 1.0, "b": 1.0}))
    data = build_data(_two_sources(tmp_path, stages), seed=0, cache_dir=cache)
    it = iter(data.train_dataset(ROWS, seed=1))
    reference = _take(it, 12)
    it.close()
    by_step = [{a[0] for a in _answers(data, [b])} for b in reference]
    assert all(s == {"a"} for s in by_step[:4]) and all(s == {"b"} for s in by_step[4:8])
    assert set().union(*by_step[8:]) == {"a", "b"}
    for stop in (2, 4, 6, 9):
        stopped = iter(data.train_dataset(ROWS, seed=1))
        _take(stopped, stop)
        state = json.loads(json.dumps(stopped.get_state()))
        stopped.close()
        resumed = iter(data.train_dataset(ROWS, seed=1))
        resumed.set_state(state)
        rest = _take(resumed, 12 - stop)
        resumed.close()
        for got, want in zip(rest, reference[stop:]):
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
    with pytest.raises(DataError, match=r"unknown source names \['c'\]"):
        build_data(_two_sources(tmp_path, (StageConfig(0, {"c": 1.0}),)), seed=0, cache_dir=cache).train_dataset(
            ROWS, seed=0
        )


def test_bad_records_raise_when_asked(tmp_path, cache):
    cfg = _two_sources(tmp_path, on_bad_record="raise")
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write("{oops\n")
    with pytest.raises(DataError, match=r"^data.on_bad_record=raise: .*b\.jsonl:31: invalid JSON"):
        build_data(cfg, seed=0, cache_dir=cache)


def test_truncation_drops_whole_turns_first(tmp_path, cache):
    long = " ".join(str(i) for i in range(100))  # digits are split: ~300 tokens
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": long},
                {"role": "assistant", "content": long},
            ]
        },
        _qa("Say " + long, "cut inside"),
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 5))
    data = build_data(
        DataConfig(max_length=LENGTH, max_dropped_fraction=0.6, sources=(SourceConfig(path=str(path)),)),
        seed=0,
        cache_dir=cache,
    )
    r = data.source_reports["t.jsonl"]
    assert r.truncations == {"whole turns": 5} and r.dropped == {"no_trained_tokens": 5}
    it = iter(data.train_dataset(ROWS, seed=0))
    assert set(_answers(data, _take(it, 2))) == {"hi"}
    it.close()


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.sources=[{path: a.jsonl, format: csv}]",
            "data.sources[0].format: expected one of messages, alpaca, sharegpt, prompt_completion, text, got 'csv'",
        ),
        ("data.sources=[{path: a.jsonl, colums: {}}]", "unknown config key data.sources[0].colums; did you mean"),
        ("data.sources=[{path: a.jsonl, columns: [a]}]", "data.sources[0].columns: expected a mapping of str to str"),
        ("data.sources=[{format: text}]", "data.sources[0].path: required"),
        ("data.sources=[{path: a.jsonl, weight: -1}]", "data.sources[0].weight=-1.0: expected a non-negative number"),
        (
            "data.stages=[{start_step: 5, weights: {a: 1}}]",
            "data.stages: start_step values [5] must increase and begin at 0",
        ),
        ("data.weight_by=bytes", "data.weight_by: expected one of examples, tokens, got 'bytes'"),
    ],
)
def test_source_config_errors_name_the_key(override, message):
    from jaxsft import config as config_lib
    from jaxsft import config_load

    with pytest.raises(config_lib.ConfigError) as e:
        config_load.load(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)
