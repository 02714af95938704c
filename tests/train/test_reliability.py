"""Reliability end to end (docs/reliability.md): SIGTERM saves and resumes exactly, a damaged
checkpoint falls back and still ends bitwise equal, non-finite steps stop the run in one line.
Each test trains a tiny model more than once: all slow."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import DEMO_CONFIG, main
from jaxsft.train import step as step_lib
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

from test_trainer import TINY as TRAINER_TINY

TINY = [*TRAINER_TINY, "train.eval_every=1000"]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _args(run, *extra):
    return TINY + [f"train.run_dir={run}", *extra]


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _logged_steps(run):
    return [r["step"] for r in _records(run) if "loss" in r]


def _wait_for_step(run, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and any(s >= step for s in _logged_steps(run)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step} (exit {proc.poll()})")


def test_sigterm_saves_the_current_step_and_the_same_command_resumes_exactly(tmp_path):
    steps = ["train.steps=150", "checkpoint.every=1000"]
    straight = tmp_path / "straight"
    train(config_load.load(DEMO_CONFIG, _args(straight, *steps)))  # what `jaxsft train` loads

    run = tmp_path / "run"
    command = [sys.executable, "-m", "jaxsft.cli", "train"] + [a for kv in _args(run, *steps) for a in ("--set", kv)]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    _wait_for_step(run, 5, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("jaxsft: stopped by SIGTERM after step ") and "run the same command to resume" in last
    saved = int(last.split("after step ")[1].split(":")[0])
    assert 5 <= saved < 150 and (run / "checkpoints" / str(saved)).is_dir()

    summary = train(config_load.load(DEMO_CONFIG, _args(run, *steps)))  # the same command
    assert summary.start_step == saved
    jax.tree.map(np.testing.assert_array_equal, read_state(straight, 150), read_state(run, 150))
    assert _logged_steps(run) == list(range(1, 151))  # one record per step, none twice
    assert [r["step"] for r in _records(run) if "eval_loss" in r] == [0, 150]
    straight_losses = [r["loss"] for r in _records(straight) if "loss" in r]
    assert [r["loss"] for r in _records(run) if "loss" in r] == straight_losses


def test_damaged_latest_checkpoint_falls_back_and_ends_equal(tmp_path, capsys):
    steps = ["train.steps=6", "checkpoint.every=3"]
    run = tmp_path / "run"
    train(config_load.load(None, _args(run, *steps)))
    straight = read_state(run, 6)
    # As if the run had died after writing step 6 but before finishing: the metrics of 4..6 are
    # on disk, and step 6's largest state file is damaged.
    done = run / "done"
    shutil.copytree(run / "checkpoints" / "6", done)
    state_files = [p for p in (run / "checkpoints" / "6" / "state").rglob("*") if p.is_file()]
    biggest = max(state_files, key=lambda p: p.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x10
    biggest.write_bytes(bytes(data))
    (run / "config.yaml").unlink()
    capsys.readouterr()
    summary = train(config_load.load(None, _args(run, "train.steps=6", "checkpoint.every=3")))
    err = capsys.readouterr().err
    assert summary.start_step == 3
    assert f"checkpoint 6 in {run / 'checkpoints'} is damaged: {biggest} does not match its sha256" in err
    jax.tree.map(np.testing.assert_array_equal, straight, read_state(run, 6))
    assert _logged_steps(run) == [1, 2, 3, 4, 5, 6]


def test_non_finite_steps_stop_the_run_with_exit_code_3(tmp_path, capsys, monkeypatch):
    for name in ("cross_entropy_sum", "chunked_cross_entropy_sum"):  # whichever the loss_chunk picks
        real = getattr(step_lib, name)
        monkeypatch.setattr(step_lib, name, lambda *a, real=real, **k: (real(*a, **k)[0] * np.nan, real(*a, **k)[1]))
    run = tmp_path / "run"
    args = ["train"] + [
        a
        for kv in _args(run, "train.steps=20", "checkpoint.every=1", "train.max_skipped_steps=3")
        for a in ("--set", kv)
    ]
    assert main(args) == 3
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("jaxsft: stopped at step 3: 3 steps in a row had a non-finite loss")
    assert [r["skipped"] for r in _records(run) if "loss" in r] == [1.0, 1.0, 1.0]
    state = read_state(run)
    assert int(state["step"]) == 2  # the last checkpoint before the stop, written whole and finite
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))
