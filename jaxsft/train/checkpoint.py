"""Checkpoints: the train state and the Grain iterator state, saved together by Orbax.

One `CheckpointManager` under `<run_dir>/checkpoints`, async, keeping the last N. The
data iterator's position is part of every checkpoint, so a resumed run continues with
exactly the batches the uninterrupted run would have seen (invariant 6). Restoring
takes abstract arrays carrying the target shardings, so a checkpoint lands directly on
the current mesh.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxsft.config import CheckpointConfig
from jaxsft.data import shards
from jaxsft.train import distributed, verify
from jaxsft.train.faults import CheckpointDamaged, CheckpointWriteFailed
from jaxsft.train.metrics import console


class Checkpointer:
    """Saves on the interval, verifies each save, rotates only verified steps (module docstring).

    Orbax's own `max_to_keep` is off: it would delete a good checkpoint as soon as a newer
    one is written, before anyone knows the newer one is whole. Here, once Orbax has
    finalised step N (in a background thread, while training goes on), its files are
    hashed into a manifest (verify.py) and only then are the steps older than the newest
    `keep` verified ones removed. A failed write surfaces at the next `check()` or `save()`
    as one line (`CheckpointWriteFailed`), and the previous checkpoint stays as it was.

    Before each write the directory is probed (a small file written, synced and removed)
    and its free space compared with the checkpoint's size, so that a read-only or full
    disk stops the run in one line at that save, before Orbax starts writing (its own
    failures surface from several threads, with tracebacks). A write that still fails
    part-way (space taken by another process meanwhile) is reported the same way, and
    its temporary directory is removed at the next start (`cleanup_tmp_directories`).
    """

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        # The interval is decided in `save` (Orbax's own policy would also save the first step).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,
            enable_async_checkpointing=cfg.async_save,
            create=True,
            cleanup_tmp_directories=True,  # what a failed or killed write left behind
        )
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._finisher: threading.Thread | None = None
        self._failure: str | None = None
        self._reported = False
        self.last_verified: int | None = None
        if cfg.enabled and (problem := self._unwritable()):
            raise CheckpointWriteFailed(f"cannot write checkpoints to {self.directory}: {problem}; nothing was trained")

    def steps(self) -> list[int]:
        """The finalised steps on disk, oldest first (Orbax's temporary directories are not steps)."""
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it did."""
        if not self.cfg.enabled or not (force or step % self.cfg.every == 0):
            return False
        if not verify.all_finite(state):
            console.print(
                f"warning: not saving step {step}: the train state holds non-finite values "
                f"(the newest checkpoint stays step {self.latest_step()})"
            )
            return False
        self._finish_previous()
        self._check_room(step, state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        try:
            saved = self.manager.save(step, args=args, force=True)
        except Exception as e:  # noqa: BLE001 - any failure of the write is reported the same way
            self._failure = f"checkpoint {step} could not be written to {self.directory}: {_one_line(e)}"
            self._raise_failure()
        self._finisher = threading.Thread(target=self._finish, args=(step,), name=f"jaxsft-verify-{step}", daemon=True)
        self._finisher.start()
        return saved

    def _finish(self, step: int) -> None:
        """Background: wait for Orbax to finalise `step`, record its checksums, rotate."""
        try:
            self.manager.wait_until_finished()
            if distributed.is_main():
                verify.write_manifest(self.directory / str(step), step)
                self._rotate()
            self.last_verified = step
        except Exception as e:  # noqa: BLE001
            self._failure = f"checkpoint {step} could not be written to {self.directory}: {_one_line(e)}"

    def _unwritable(self) -> str | None:
        """Why a file cannot be written in the checkpoint directory (read-only, full), or None."""
        probe = self.directory / f".jaxsft-write-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            return _one_line(e)
        finally:
            with contextlib.suppress(OSError):  # absent, or a read-only directory refusing even that
                probe.unlink()
        return None

    def _check_room(self, step: int, state) -> None:
        """Stops before writing `step` when the directory is unwritable or too full for it.

        The size is the state's bytes (what Orbax writes, uncompressed) or the newest
        verified checkpoint's files, whichever is larger, plus 5%. On several processes the
        main process decides for all, so that none enters Orbax's collective save alone.
        """
        problem = None
        if distributed.is_main():
            problem = self._unwritable()
            if problem is None:
                needed = 1.05 * max(_state_bytes(state), self._newest_bytes()) + (64 << 10)
                free = shutil.disk_usage(self.directory).free
                if free < needed:
                    problem = (
                        f"{free / 2**20:.1f} MiB free on its disk, the checkpoint needs about {needed / 2**20:.1f} MiB"
                    )
        if jax.process_count() > 1:
            failed = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
            if failed and problem is None:
                problem = "the main process could not write it (see its log)"
        if problem:
            self._failure = f"checkpoint {step} could not be written to {self.directory}: {problem}"
            self._raise_failure()

    def _newest_bytes(self) -> int:
        for step in reversed(self.steps()):
            manifest = self.directory / str(step) / verify.MANIFEST
            if manifest.is_file():
                try:
                    files = json.loads(manifest.read_text())["files"]
                    return sum(int(f["bytes"]) for f in files.values())
                except (OSError, ValueError, KeyError, TypeError):
                    return 0
        return 0

    def _rotate(self) -> None:
        verified = [s for s in self.steps() if verify.has_manifest(self.directory / str(s))]
        if len(verified) <= self.cfg.keep:
            return
        oldest_kept = verified[-self.cfg.keep]
        for step in self.steps():
            if step < oldest_kept:
                shutil.rmtree(self.directory / str(step), ignore_errors=True)
        self.manager.reload()

    def _finish_previous(self) -> None:
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure:
            failure, self._failure = self._failure, None
            kept = (
                f"step {self.last_verified} is intact"
                if self.last_verified
                else "the earlier checkpoints are intact"
                if self.steps()
                else "no checkpoint of this run was written yet"
            )
            self._reported = True
            raise CheckpointWriteFailed(f"{failure}; {kept}, fix the disk and run the same command")

    def check(self) -> None:
        """Raises a background save's failure once it is known (cheap: call it every step)."""
        if self._failure and not (self._finisher and self._finisher.is_alive()):
            self._raise_failure()

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state onto the shardings of `abstract_state` and moves the iterator in place.

        Grain writes one iterator state per process (`process_i-of-n.json`), each holding
        the states of that process's virtual shards (data/shards.py). They are merged and
        the iterator takes the shards it owns, so any process count resumes exactly.
        Returns (state, whether the data position was restored): False only for a
        checkpoint written before virtual shards, whose data state cannot be mapped.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        state = self.manager.restore(step, args=ocp.args.Composite(**items)).state
        files = sorted((self.directory / str(step) / "data").glob("process_*-of-*.json"))
        saved = [json.loads(f.read_text()) for f in files]
        if not saved or any(not isinstance(s, dict) or shards.KEY not in s for s in saved):
            return state, False
        data_iterator.set_state(shards.merge_process_states(saved))
        return state, True

    def restore_latest(self, abstract_state, data_iterator):
        """(step, state, data restored) of the newest good checkpoint, or (0, None, True) for none.

        Each step from the newest is checked against its manifest, read, and checked for
        finite values; a damaged one is reported in one line and moved aside to
        `<run_dir>/damaged_checkpoints/` (or stops the run: checkpoint.on_corrupt=fail).
        Checkpoints of a run that never wrote manifests (older jaxsft) are read unverified.
        """
        steps = self.steps()
        any_verified = any(verify.has_manifest(self.directory / str(s)) for s in steps)
        for step in reversed(steps):
            found = verify.problem(self.directory / str(step)) if any_verified else None
            if found is None:
                try:
                    state, data_restored = self.restore(step, abstract_state, data_iterator)
                except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
                    found = f"it cannot be read: {_one_line(e)}"
                else:
                    found = None if verify.all_finite(state) else "it holds non-finite values"
            if found is None:
                if not any_verified:
                    console.print(
                        f"warning: checkpoint {step} has no checksums (written by an older jaxsft): restored unverified"
                    )
                self.last_verified = step
                return step, state, data_restored
            self._set_aside(step, found)
        return 0, None, True

    def _set_aside(self, step: int, found: str) -> None:
        message = f"checkpoint {step} in {self.directory} is damaged: {found}"
        if self.cfg.on_corrupt == "fail":
            raise CheckpointDamaged(
                f"{message} (checkpoint.on_corrupt=fail; set it to fallback to resume from the newest good checkpoint)"
            )
        distributed.barrier("jaxsft_set_aside")  # every process has checked before the step moves
        if distributed.is_main():
            aside = self.run_dir / "damaged_checkpoints" / str(step)
            aside = aside.with_name(f"{step}.{int(time.time())}") if aside.exists() else aside
            aside.parent.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(aside))
            message += f"; moved to {aside}"
        console.print(f"warning: {message}; falling back to the previous checkpoint")
        distributed.barrier("jaxsft_set_aside_done")
        self.manager.reload()

    def close(self) -> None:
        """Waits for the last write and its verification; raises if it failed."""
        try:
            self._finish_previous()
        finally:
            try:
                self.manager.wait_until_finished()
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - Orbax re-raises a failed write here
                if not self._reported:  # otherwise already stopped the run in one line
                    self._reported = True
                    raise CheckpointWriteFailed(
                        f"a checkpoint could not be written to {self.directory}: {_one_line(e)}; "
                        f"fix the disk and run the same command"
                    ) from None


def _state_bytes(state) -> int:
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state) if hasattr(x, "shape")
    )


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _one_line(e: BaseException) -> str:
    """The error in one line; TensorStore's long write errors reduced to their OS error."""
    if found := re.search(r"([^:\]]+?) \[os_error_code='(\d+)'\]", str(e)):
        return f"[Errno {found.group(2)}] {found.group(1).strip()}"
    for code in _DISK_ERRNOS if not isinstance(e, OSError) else ():  # TensorStore's other wordings
        if os.strerror(code) in str(e):
            return f"[Errno {code}] {os.strerror(code)}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def read_state(run_dir: str | Path, step: int | None = None):
    """The train state of a checkpoint on this process's first device (latest step by default).

    For tools and tests: it reads checkpoints written under any mesh or process count.
    """
    manager = ocp.CheckpointManager(
        Path(run_dir).absolute() / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    saved = ocp.StandardCheckpointer().metadata(manager.directory / str(step) / "state").item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    manager.close()
    return restored.state
