"""Every number in the config tree has a range, and a value outside it fails at load in one line."""

import math

import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.config_ranges import INT_MAX, RANGES, numeric_fields


def _outside(key, tp):
    allowed = RANGES[key]
    if allowed.low > -math.inf:
        value = allowed.low if allowed.low_open else allowed.low - 1
        if value in allowed.allow:
            value -= 1
    else:
        value = allowed.high if allowed.high_open else allowed.high + 1
    return int(value) if tp is int or (tp is not float and float(value).is_integer()) else float(value)


def _raw(key: str, value) -> dict:
    """The smallest raw tree that sets `key` (table syntax) to `value`."""
    if key.startswith("data.sources[]."):
        return {"data": {"sources": [{"path": "a.jsonl", "name": "a", key.split(".")[-1]: value}]}}
    if key.startswith("data.stages[]."):
        stage = {"start_step": 0, "weights": {"a": 1.0}}
        field = key.split(".")[2]
        stage[field] = {"a": value} if field == "weights" else value
        return {"data": {"sources": [{"path": "a.jsonl", "name": "a"}], "stages": [stage]}}
    tree: dict = {}
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
    return tree


def _fails_in_one_line(raw, *words):
    with pytest.raises(ConfigError) as info:
        config_load.from_dict(raw)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_every_numeric_field_has_a_range():
    fields = {key for key, _ in numeric_fields()}
    assert fields == set(RANGES), f"fields without a range: {fields - set(RANGES)}; stale: {set(RANGES) - fields}"


@pytest.mark.parametrize("key, tp", list(numeric_fields()), ids=[k for k, _ in numeric_fields()])
def test_out_of_range_value_fails_at_load(key, tp):
    value = _outside(key, tp)
    leaf = key.split(".")[-1] if not key.endswith(".*") else key.split(".")[-2]
    _fails_in_one_line(_raw(key, value), leaf, str(value))
    if tp is float or float in getattr(tp, "__args__", ()):
        for bad in (math.nan, math.inf):
            _fails_in_one_line(_raw(key, bad), leaf, "finite")
    else:
        _fails_in_one_line(_raw(key, INT_MAX + 1), leaf, str(INT_MAX))


def test_defaults_are_in_range():
    config_load.from_dict({})


@pytest.mark.parametrize(
    "override",
    [
        "optim.learning_rate=nan",
        "optim.learning_rate=.inf",
        "optim.learning_rate=1e30",
        "optim.b2=1.0",
        "train.global_batch_size=0",
    ],
)
def test_cli_refuses_before_reading_data(override, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--set", override, "--set", f"train.run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("jaxsft: error: ") and override.split("=")[0] in err
    assert not run.exists()
