"""The run directory is the record: a changed config is refused, or allowed and recorded."""

import json

import jax
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.train import run_record, trainer
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

from test_trainer import TINY as TRAINER_TINY

TINY = [*TRAINER_TINY, "train.eval_every=1000"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(run, *extra):
    return config_load.load(None, TINY + [f"train.run_dir={run}", *extra])


def _trained_dir(run, *extra):
    """A run directory as a 3-step run leaves it (config.yaml, a checkpoint), without training."""
    cfg = _cfg(run, "train.steps=3", *extra)
    (run / "checkpoints" / "3").mkdir(parents=True)
    config_load.save(cfg, run / "config.yaml")
    return cfg


def test_a_changed_config_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    _trained_dir(run)
    with pytest.raises(ConfigError) as e:
        run_record.check(_cfg(run, "train.steps=3", "optim.learning_rate=0.003", "data.max_length=96"))
    message = str(e.value)
    assert "\n" not in message and str(run) in message and "--allow-config-change" in message
    assert "optim.learning_rate 0.001 -> 0.003" in message and "data.max_length 64 -> 96" in message


def test_cli_refuses_before_reading_data_and_keeps_config_yaml(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _trained_dir(run)
    before = (run / "config.yaml").read_text()
    monkeypatch.setattr(trainer, "build_data", lambda *a, **k: pytest.fail("the data was read"))
    args = [
        a for kv in TINY + [f"train.run_dir={run}", "train.steps=3", "optim.learning_rate=0.003"] for a in ("--set", kv)
    ]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.learning_rate 0.001 -> 0.003" in err
    assert (run / "config.yaml").read_text() == before and not (run / run_record.HISTORY_NAME).exists()


def test_safe_keys_and_raised_steps_pass_and_are_recorded(tmp_path):
    run = tmp_path / "run"
    _trained_dir(run)
    cfg = _cfg(run, "train.steps=6", "logging.log_every=5", "checkpoint.every=2", "train.eval_every=50")
    diffs = run_record.check(cfg)
    assert set(diffs) == {"train.steps", "logging.log_every", "checkpoint.every", "train.eval_every"}
    said = []
    run_record.record(cfg, diffs, 3, said.append)
    (line,) = [json.loads(x) for x in (run / run_record.HISTORY_NAME).read_text().splitlines()]
    assert line["step"] == 3 and line["changes"]["train.steps"] == [3, 6]
    assert any(s.startswith("train.steps 3 -> 6: the learning-rate schedule now decays over 6 steps") for s in said)
    assert config_load.load(run / "config.yaml") == cfg


def test_lowering_steps_is_a_change_and_a_fresh_directory_is_not_compared(tmp_path):
    run = tmp_path / "run"
    _trained_dir(run, "train.steps=10")
    with pytest.raises(ConfigError, match="train.steps 10 -> 5"):
        run_record.check(_cfg(run, "train.steps=5"))
    (run / "checkpoints" / "3").rmdir()  # nothing trained yet: nothing to protect
    assert run_record.check(_cfg(run, "train.steps=5", "optim.learning_rate=0.003")) == {}


def test_an_allowed_change_is_appended_to_the_history(tmp_path):
    run = tmp_path / "run"
    _trained_dir(run)
    cfg = _cfg(run, "train.steps=3", "optim.learning_rate=0.003")
    run_record.record(cfg, run_record.check(cfg, allow_change=True), 3, lambda s: None)
    cfg2 = _cfg(run, "train.steps=3", "optim.learning_rate=0.002")
    run_record.record(cfg2, run_record.check(cfg2, allow_change=True), 3, lambda s: None)
    lines = [json.loads(x) for x in (run / run_record.HISTORY_NAME).read_text().splitlines()]
    assert [x["changes"] for x in lines] == [
        {"optim.learning_rate": [0.001, 0.003]},
        {"optim.learning_rate": [0.003, 0.002]},
    ]
    assert config_load.load(run / "config.yaml").optim.learning_rate == 0.002


@pytest.mark.slow
def test_end_to_end_refuse_allow_and_raise_steps(tmp_path, capsys):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=3", "checkpoint.every=3"))
    with pytest.raises(ConfigError, match="optim.learning_rate 0.001 -> 0.003"):
        train(_cfg(run, "train.steps=3", "optim.learning_rate=0.003"))
    capsys.readouterr()
    summary = train(
        _cfg(run, "train.steps=5", "checkpoint.every=3", "optim.learning_rate=0.003"), allow_config_change=True
    )
    out = "".join(capsys.readouterr())
    assert summary.start_step == 3 and "train.steps 3 -> 5: the learning-rate schedule" in out
    (line,) = [json.loads(x) for x in (run / run_record.HISTORY_NAME).read_text().splitlines()]
    assert line["step"] == 3 and line["changes"] == {"train.steps": [3, 5], "optim.learning_rate": [0.001, 0.003]}
    assert np.isfinite(jax.tree.leaves(read_state(run, 5)["params"])[0]).all()
