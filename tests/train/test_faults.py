"""Numerical faults skip the update; K skips in a row stop the run; one writer per run directory."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxsft.cli import main
from jaxsft.train import runlock, sharding
from jaxsft.train.faults import NumericalFault, RunDirLocked
from jaxsft.train.guard import SkipGuard
from jaxsft.train.runlock import RunLock

from train_helpers import Setup


def test_non_finite_step_changes_nothing_but_the_step(batches):
    setup = Setup(devices=jax.devices()[:1])
    before = jax.device_get(setup.state)
    poisoned = dict(batches[0], loss_weights=np.where(batches[0]["loss_weights"] > 0, np.nan, 0.0).astype(np.float32))
    with setup.program.context():
        state, metrics = setup.step(setup.state, sharding.global_batch(poisoned, setup.batch_sharding))
    assert float(metrics["skipped"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after["step"]) == int(before["step"]) + 1
    jax.tree.map(np.testing.assert_array_equal, after["params"], before["params"])
    jax.tree.map(np.testing.assert_array_equal, after["opt_state"], before["opt_state"])
    setup.state = state
    setup.run(batches[1:2])  # a good batch afterwards trains as usual
    changed = jax.tree.leaves(
        jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(setup.state["params"]), before["params"])
    )
    assert any(changed)


def test_skip_guard_stops_after_k_in_a_row():
    guard = SkipGuard(3)
    for step, flag in enumerate([1, 1, 0, 1, 1, 0], start=1):  # never 3 in a row
        guard.observe(step, np.float32(flag))
        guard.check()
    guard.flush()
    assert guard.total == 4 and guard.consecutive == 0
    with pytest.raises(NumericalFault) as info:
        for step in range(7, 12):  # read one step late: the third skip (step 9) is counted at step 10
            guard.observe(step, np.float32(1))
            guard.check()
    assert "\n" not in str(info.value) and "stopped at step 9" in str(info.value) and info.value.exit_code == 3


def _sleeper():
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_second_writer_is_refused_in_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = _sleeper()
    try:
        (run / runlock.LOCK_NAME).write_text(
            json.dumps(
                {
                    "host": socket.gethostname(),
                    "pid": holder.pid,
                    "started": runlock._start_time(holder.pid),
                    "since": "2026-01-01 00:00:00",
                }
            )
        )
        assert main(["train", "--set", f"train.run_dir={run}"]) == RunDirLocked.exit_code == 4
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {holder.pid}" in err and socket.gethostname() in err
        assert not (run / "config.yaml").exists()  # refused before anything was read or written
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file = tmp_path / runlock.LOCK_NAME
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "1"}))
    with RunLock(tmp_path):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(RunDirLocked):
            RunLock(tmp_path).acquire()  # held by a live process (this one)
    assert not lock_file.exists()


def test_reused_pid_is_stale_and_other_hosts_are_not(tmp_path):
    lock_file = tmp_path / runlock.LOCK_NAME
    lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": "not-now"}))
    with RunLock(tmp_path):  # same pid, another start time: a reused pid
        pass
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(RunDirLocked, match="host elsewhere, pid 1"):
        RunLock(tmp_path).acquire()


def test_unwritable_run_dir_is_a_config_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--set", f"train.run_dir={blocker / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.run_dir" in err and "cannot write" in err
