"""Crash at any moment, resume exactly: `jaxsft train` in a subprocess killed with SIGKILL
(before the first step, after some steps, while a checkpoint is being written, right after a
resume), restarted each time; the last run ends bitwise equal to an uninterrupted one, with
one metrics.jsonl record per step."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import DEMO_CONFIG
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train
from jaxsft.train.verify import has_manifest

from test_trainer import TINY as TRAINER_TINY

TINY = [*TRAINER_TINY, "train.eval_every=1000", "train.steps=60", "checkpoint.every=2", "checkpoint.keep=2"]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _args(run):
    return TINY + [f"train.run_dir={run}"]


def _logged_steps(run):
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.endswith("}") and '"loss"' in x]


def _saving(run) -> bool:
    """A checkpoint is being written: an Orbax temporary directory, or a step not yet verified."""
    directory = run / "checkpoints"
    entries = list(directory.iterdir()) if directory.is_dir() else []
    return any(not p.name.isdigit() or not has_manifest(p) for p in entries if p.is_dir())


def _after_steps(n):
    return lambda run, first: max(_logged_steps(run), default=0) >= n


def _mid_save(run, first):
    return max(_logged_steps(run), default=0) > 2 and _saving(run)


def _right_after_resume(run, first):
    return max(_logged_steps(run), default=0) > first


MOMENTS = {  # when to kill, given the run directory and the newest step logged before this start
    "before the first step": lambda run, first: None,  # after a fixed delay: importing, reading data, compiling
    "after 5 steps": _after_steps(5),
    "while a checkpoint is written": _mid_save,
    "right after a resume": _right_after_resume,
}


def _start_and_kill(run, moment, log, timeout=300):
    first = max(_logged_steps(run), default=0)
    command = [sys.executable, "-m", "jaxsft.cli", "train"] + [a for kv in _args(run) for a in ("--set", kv)]
    proc = subprocess.Popen(command, stdout=log, stderr=log, env=os.environ.copy())
    deadline, condition = time.time() + timeout, MOMENTS[moment]
    if moment == "before the first step":
        time.sleep(4)
    else:
        while time.time() < deadline and proc.poll() is None and not condition(run, first):
            time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before {moment!r} (exit {proc.returncode})"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_at_several_moments_then_the_same_command_ends_bitwise_equal(tmp_path):
    straight = tmp_path / "straight"
    train(config_load.load(DEMO_CONFIG, _args(straight)))

    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "wb") as log:
        for moment in MOMENTS:
            _start_and_kill(run, moment, log)
    summary = train(config_load.load(DEMO_CONFIG, _args(run)))  # the same command, once more
    assert summary.start_step > 0 and summary.final_step == 60
    jax.tree.map(np.testing.assert_array_equal, read_state(straight, 60), read_state(run, 60))
    assert _logged_steps(run) == list(range(1, 61))  # one record per step, none twice
    straight_losses = [json.loads(x).get("loss") for x in (straight / "metrics.jsonl").read_text().splitlines()]
    losses = [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [v for v in losses if v is not None] == [v for v in straight_losses if v is not None]
