"""Checkpoints are verified: checksums at save, damage found at restore, rotation keeps the good."""

import errno

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.config import CheckpointConfig
from jaxsft.train import verify
from jaxsft.train.checkpoint import Checkpointer
from jaxsft.train.faults import CheckpointDamaged, CheckpointWriteFailed


def _state(step: int, fill: float = 1.0):
    return {
        "step": jnp.int32(step),
        "params": {"w": jnp.full((64, 64), fill * step, jnp.float32)},
        "opt_state": {"mu": jnp.full((64,), 0.5 * step, jnp.float32)},
    }


def _abstract():
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(1))


@pytest.fixture
def iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _save_steps(run, steps, iterator, **cfg):
    checkpointer = Checkpointer(run, CheckpointConfig(every=1, **cfg))
    for step in steps:
        checkpointer.save(step, _state(step), iterator)
    checkpointer.close()


def _restore(run, iterator, **cfg):
    checkpointer = Checkpointer(run, CheckpointConfig(**cfg))
    try:
        return checkpointer.restore_latest(_abstract(), iterator)
    finally:
        checkpointer.close()


def test_saves_are_verified_and_rotation_keeps_the_newest(tmp_path, iterator):
    run = tmp_path / "run"
    _save_steps(run, [1, 2, 3, 4], iterator, keep=2)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "4"]
    for step in (3, 4):
        assert verify.has_manifest(run / "checkpoints" / str(step))
        assert verify.problem(run / "checkpoints" / str(step)) is None
    step, state, _ = _restore(run, iterator)
    assert step == 4 and float(state["params"]["w"][0, 0]) == 4.0


def _largest_state_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped_byte": lambda d: _flip(_largest_state_file(d)),
    "truncated": lambda d: _largest_state_file(d).write_bytes(_largest_state_file(d).read_bytes()[:10]),
    "deleted": lambda d: _largest_state_file(d).unlink(),
    "data_state_deleted": lambda d: next((d / "data").glob("process_*")).unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_with_a_warning(tmp_path, iterator, capsys, damage):
    run = tmp_path / "run"
    _save_steps(run, [1, 2], iterator)
    DAMAGE[damage](run / "checkpoints" / "2")
    capsys.readouterr()
    step, state, _ = _restore(run, iterator)
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0
    warning = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(warning) == 1 and "checkpoint 2 in" in warning[0] and str(run) in warning[0]
    assert (run / "damaged_checkpoints" / "2").is_dir() and not (run / "checkpoints" / "2").exists()


def test_damage_with_on_corrupt_fail_is_one_line(tmp_path, iterator):
    run = tmp_path / "run"
    _save_steps(run, [1, 2], iterator)
    bad = _largest_state_file(run / "checkpoints" / "2")
    _flip(bad)
    with pytest.raises(CheckpointDamaged) as info:
        _restore(run, iterator, on_corrupt="fail")
    message = str(info.value)
    assert "\n" not in message and "checkpoint 2" in message and str(bad) in message and "sha256" in message
    assert info.value.exit_code == 5
    assert (run / "checkpoints" / "2").is_dir()  # fail touches nothing


def test_non_finite_state_is_never_saved(tmp_path, iterator, capsys):
    run = tmp_path / "run"
    checkpointer = Checkpointer(run, CheckpointConfig(every=1))
    assert checkpointer.save(1, _state(1), iterator)
    assert not checkpointer.save(2, _state(2, fill=np.nan), iterator)
    checkpointer.close()
    assert checkpointer.steps() == [1]
    assert "not saving step 2" in capsys.readouterr().err


def test_failed_write_stops_in_one_line_and_keeps_the_good_checkpoint(tmp_path, iterator, monkeypatch):
    run = tmp_path / "run"
    real = verify.write_manifest

    def disk_full_at_3(step_dir, step):
        if step == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(step_dir, step)

    monkeypatch.setattr(verify, "write_manifest", disk_full_at_3)
    checkpointer = Checkpointer(run, CheckpointConfig(every=1, keep=1))
    checkpointer.save(1, _state(1), iterator)
    checkpointer.save(2, _state(2), iterator)
    checkpointer.save(3, _state(3), iterator)
    with pytest.raises(CheckpointWriteFailed) as info:
        checkpointer.close()
    message = str(info.value)
    assert "\n" not in message and "checkpoint 3" in message and "No space left" in message
    assert "step 2 is intact" in message and info.value.exit_code == 6
    assert checkpointer.steps() == [2, 3]  # 2 is not rotated away for the unverified 3
    monkeypatch.undo()
    step, _, _ = _restore(run, iterator)
    assert step == 2  # 3 was never verified: set aside


def test_write_errors_reduce_to_their_os_error_in_one_line():
    from jaxsft.train.checkpoint import _one_line

    coded = ValueError(
        "RESOURCE_EXHAUSTED: Error writing x: Failed to write: No space left on device [os_error_code='28']"
    )
    assert _one_line(coded) == "[Errno 28] No space left on device"
    # TensorStore's wording for a directory it could not create carries no os_error_code.
    uncoded = ValueError(
        'RESOURCE_EXHAUSTED: Error opening "zarr" driver: Failed to create directory: "d" [No space left on device]'
    )
    assert _one_line(uncoded) == "[Errno 28] No space left on device"
    read_only = OSError(errno.EROFS, "Read-only file system", "/ckpt")  # an OSError keeps its path
    assert _one_line(read_only) == "[Errno 30] Read-only file system: '/ckpt'"
    assert _one_line(RuntimeError("first line\nsecond")) == "first line"
