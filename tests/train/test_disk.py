"""Promise 8 (docs/reliability.md) on real filesystems: a full or read-only checkpoint disk.

The checkpoint directory is a small tmpfs mounted in a private user + mount namespace
(`unshare -rm`, no privileges needed where user namespaces are enabled), so the writes fail
in the kernel exactly as on a full or read-only disk. The in-process variants (a write that
fails after Orbax started) are in test_checkpoint_verify.py.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsft.train.verify import has_manifest

from test_trainer import TINY as TRAINER_TINY

pytestmark = pytest.mark.slow

ARGS = [*TRAINER_TINY, "train.eval_every=1000", "train.steps=10", "checkpoint.every=2", "checkpoint.keep=2"]
CHECKPOINT_KIB = 616  # this config's state on one device: 51,360 float32 params x 3 (params, two moments)
ONE_DEVICE = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # conftest's 8 fake devices off


@pytest.fixture(autouse=True)
def _namespaces(tmp_path_factory, monkeypatch):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("mounting a test filesystem needs user + mount namespaces (unshare -rm)")
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _train_command(run: Path) -> str:
    args = [sys.executable, "-m", "jaxsft.cli", "train"] + [a for kv in ARGS for a in ("--set", kv)]
    return shlex.join([*args, "--set", f"train.run_dir={run}"])


def _train_on_tmpfs(run: Path, mount_options: str, env=None) -> subprocess.CompletedProcess:
    """`jaxsft train` with RUN/checkpoints on a fresh tmpfs; what it held afterwards is copied to RUN/seen."""
    (run / "checkpoints").mkdir(parents=True)
    script = (
        f"mount -t tmpfs -o {mount_options} tmpfs {run}/checkpoints || exit 99; "
        f"{_train_command(run)}; rc=$?; cp -a {run}/checkpoints {run}/seen; exit $rc"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=900,
        env=env or os.environ.copy(),
    )
    assert done.returncode != 99, done.stderr
    return done


def _jaxsft_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("jaxsft:")]


def test_a_full_disk_stops_the_run_in_one_line_at_that_save_and_the_same_command_resumes(tmp_path):
    run = tmp_path / "run"
    # Room for two checkpoints and a little: the third (step 6) cannot fit before rotation, which
    # the size check finds before Orbax writes anything.
    done = _train_on_tmpfs(run, f"size={int(CHECKPOINT_KIB * 2.4)}k", ONE_DEVICE)
    assert done.returncode == 6, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ERROR:absl" not in done.stderr, done.stderr[-3000:]
    (line,) = _jaxsft_lines(done.stderr)
    assert line.startswith(f"jaxsft: checkpoint 6 could not be written to {run}/checkpoints: ")
    assert "MiB free on its disk" in line and line.endswith("step 4 is intact, fix the disk and run the same command")
    seen = run / "seen"
    assert sorted(p.name for p in seen.iterdir()) == ["2", "4"]  # keep=2 held, nothing half-written
    assert all(has_manifest(seen / s) for s in ("2", "4"))

    # The disk is fixed (here: the checkpoints move to the real one); the same command goes on from 4.
    shutil.rmtree(run / "checkpoints")
    seen.rename(run / "checkpoints")
    resumed = subprocess.run(
        ["sh", "-c", _train_command(run)], capture_output=True, text=True, timeout=900, env=ONE_DEVICE
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step 4 in {run}" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "8"]


def test_a_write_that_fills_the_disk_part_way_is_one_line_too(tmp_path):
    """Room for the bytes but not for the files: the size check passes and Orbax itself runs out of
    space (ENOSPC from the inode limit) in the middle of the write. (A byte limit between the size
    check's estimate and the write was flaky: the files a checkpoint takes vary with the async writes.)"""
    run = tmp_path / "run"
    done = _train_on_tmpfs(run, "size=8m,nr_inodes=8")
    assert done.returncode == 6, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ERROR:absl" not in done.stderr, done.stderr[-3000:]
    (line,) = _jaxsft_lines(done.stderr)
    # Which write fails first varies with Orbax's async writes: TensorStore's (no path) or a
    # Python file write, whose OSError keeps the file it could not write.
    assert re.fullmatch(
        re.escape(f"jaxsft: checkpoint 2 could not be written to {run}/checkpoints: [Errno 28] No space left on device")
        + f"(: '{re.escape(str(run))}/checkpoints/[^']+')?"
        + re.escape("; no checkpoint of this run was written yet, fix the disk and run the same command"),
        line,
    ), line
    assert not [p for p in (run / "seen").iterdir() if p.name.isdigit()]  # nothing half-written passes as a step


def test_a_read_only_checkpoint_disk_stops_the_run_before_training(tmp_path):
    run = tmp_path / "run"
    done = _train_on_tmpfs(run, "ro,size=1m")
    assert done.returncode == 6, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = _jaxsft_lines(done.stderr)
    assert (
        line
        == f"jaxsft: cannot write checkpoints to {run}/checkpoints: [Errno 30] Read-only file system: "
        + (line.split("Read-only file system: ", 1)[1])
    )
    assert line.endswith("; nothing was trained")
    assert not (run / "metrics.jsonl").exists() or "loss" not in (run / "metrics.jsonl").read_text()
