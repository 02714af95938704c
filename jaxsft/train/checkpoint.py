"""Checkpoints: the train state and the Grain iterator state, saved together by Orbax.

One `CheckpointManager` under `<run_dir>/checkpoints`, async, keeping the last N. The
data iterator's position is part of every checkpoint, so a resumed run continues with
exactly the batches the uninterrupted run would have seen (invariant 6). Restoring
takes abstract arrays carrying the target shardings, so a checkpoint lands directly on
the current mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from jaxsft.config import CheckpointConfig
from jaxsft.data import shards


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        # The interval is decided in `save` (Orbax's own policy would also save the first step).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it did."""
        if not self.cfg.enabled or not (force or step % self.cfg.every == 0):
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=True)

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

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of a tree of arrays (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_state(run_dir: str | Path, step: int | None = None):
    """The train state of a checkpoint on this process's first device (latest step by default).

    For tools and tests: it reads checkpoints written under any mesh or process count.
    """
    manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    saved = ocp.StandardCheckpointer().metadata(manager.directory / str(step) / "state").item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    manager.close()
    return restored.state
