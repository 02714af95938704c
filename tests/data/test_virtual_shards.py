"""Virtual shards: the global batches are a function of (config, seed, step) alone.

Processes are simulated: process p of P feeds rows [p*G/P, (p+1)*G/P) of each global
batch (as devices hold contiguous row blocks), builds only the virtual shards holding
them, and the global batch is the rows of every process put together.
"""

import dataclasses
import json

import numpy as np
import pytest

from jaxsft.config import DataConfig, StageConfig
from jaxsft.data.pipeline import DataError, SFTData, build_data
from jaxsft.data.shards import merge_process_states, rows_of_shards, shards_for_rows

GLOBAL_ROWS, SHARDS, LENGTH = 8, 4, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SFTData:
    cfg = DataConfig(synthetic_train_examples=300, synthetic_eval_examples=8, max_length=LENGTH, virtual_shards=SHARDS)
    return build_data(cfg, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))


def _with(data: SFTData, **changes) -> SFTData:
    return dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, **changes))


class Processes:
    """P simulated processes: each builds the shards of its rows; `next` gives the global batch."""

    def __init__(self, data: SFTData, count: int, seed: int = 0):
        per = GLOBAL_ROWS // count
        self.fed = [np.arange(p * per, (p + 1) * per) for p in range(count)]
        self.shards = [shards_for_rows(rows, GLOBAL_ROWS, data.cfg.virtual_shards) for rows in self.fed]
        self.row_ids = [rows_of_shards(s, GLOBAL_ROWS, data.cfg.virtual_shards) for s in self.shards]
        self.iterators = [iter(data.train_dataset(GLOBAL_ROWS, seed=seed, shards=s)) for s in self.shards]

    def next(self) -> dict[str, np.ndarray]:
        parts = []
        for it, fed, row_ids in zip(self.iterators, self.fed, self.row_ids):
            batch = next(it)
            assert len(batch["inputs"]) == len(row_ids)
            parts.append({k: v[np.isin(row_ids, fed)] for k, v in batch.items()})
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def take(self, n: int) -> list[dict[str, np.ndarray]]:
        return [self.next() for _ in range(n)]

    def states(self) -> list[dict]:
        return [json.loads(json.dumps(it.get_state())) for it in self.iterators]  # as checkpointed

    def restore(self, saved: list[dict]) -> None:
        for it in self.iterators:
            it.set_state(merge_process_states(saved))

    def close(self) -> None:
        for it in self.iterators:
            it.close()


def _assert_equal(batches, expected):
    assert len(batches) == len(expected)
    for b, e in zip(batches, expected):
        assert set(b) == set(e)
        for k in e:
            np.testing.assert_array_equal(b[k], e[k])


def _reference(data: SFTData, steps: int) -> list[dict[str, np.ndarray]]:
    it = iter(data.train_dataset(GLOBAL_ROWS, seed=0))
    batches = [next(it) for _ in range(steps)]
    it.close()
    return batches


def _assert_resumes(data: SFTData, before: int, after: int, stop: int, steps: int) -> None:
    """`before` processes take `stop` batches and save; `after` processes restore and go on to `steps`:
    every batch equals the uninterrupted single-stream run's."""
    expected = _reference(data, steps)
    run = Processes(data, before)
    _assert_equal(run.take(stop), expected[:stop])
    saved = run.states()
    run.close()
    resumed = Processes(data, after)
    resumed.restore(saved)
    _assert_equal(resumed.take(steps - stop), expected[stop:])
    resumed.close()


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_global_batches_do_not_depend_on_the_process_count(data, processes):
    expected = _reference(data, 5)
    assert not np.array_equal(expected[0]["inputs"][:2], expected[0]["inputs"][2:4])  # shards differ
    run = Processes(data, processes)
    assert sum(len(s) for s in run.shards) == SHARDS or processes > SHARDS  # no shard built twice
    _assert_equal(run.take(5), expected)
    run.close()


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (4, 2)])
@pytest.mark.parametrize("packing", ["first_fit", "best_fit", "concat"])
def test_data_state_resumes_under_another_process_count(data, before, after, packing):
    _assert_resumes(_with(data, packing=packing), before, after, stop=3, steps=6)


def test_curriculum_resumes_under_another_process_count(tmp_path):
    files = {}
    for name, n in (("a", 40), ("b", 40)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(
            "".join(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{name} {i}"},
                            {"role": "assistant", "content": f"{name}{i}"},
                        ]
                    }
                )
                + "\n"
                for i in range(n)
            )
        )
        files[name] = str(path)
    from jaxsft.config import SourceConfig

    cfg = DataConfig(
        sources=tuple(SourceConfig(name=n, path=p) for n, p in files.items()),
        max_length=32,
        stages=(StageConfig(0, {"a": 1.0}), StageConfig(2, {"b": 1.0})),
        virtual_shards=SHARDS,
    )
    _assert_resumes(build_data(cfg, seed=0, cache_dir=tmp_path / "cache"), 2, 1, stop=1, steps=5)


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_worker_processes_resume_under_another_process_count(data):
    # Two workers each take every other sample of every shard the process owns.
    _assert_resumes(_with(data, worker_count=2), 2, 1, stop=2, steps=4)


def test_a_state_of_other_virtual_shards_is_refused(data):
    run = Processes(data, 2)
    run.take(1)
    saved = run.states()
    run.close()
    other = iter(_with(data, virtual_shards=2).train_dataset(GLOBAL_ROWS, seed=0))
    with pytest.raises(DataError, match=r"data.virtual_shards=2, but the saved data state has shards \[0, 1, 2, 3\]"):
        other.set_state(merge_process_states(saved))
    other.close()
    with pytest.raises(DataError, match=r"^data.virtual_shards=3: expected 0 \(auto\) or a divisor of the 8 rows"):
        _with(data, virtual_shards=3).train_dataset(GLOBAL_ROWS, seed=0)


def test_auto_virtual_shards_are_the_batch_s_largest_divisor_up_to_8():
    from jaxsft.data.shards import shard_count

    assert [shard_count(0, rows) for rows in (1, 4, 8, 12, 16, 7, 1024)] == [1, 4, 8, 6, 8, 7, 8]
    assert shard_count(2, 16) == 2


def test_virtual_shards_that_do_not_divide_the_batch_fail_in_the_config():
    from jaxsft import config_load
    from jaxsft.config import ConfigError

    with pytest.raises(ConfigError) as e:
        config_load.load(None, ["train.global_batch_size=16", "data.virtual_shards=3"])
    assert str(e.value) == "data.virtual_shards=3: expected 0 (auto) or a divisor of train.global_batch_size=16"
    assert config_load.load(None, ["train.global_batch_size=12"]).data.virtual_shards == 0
