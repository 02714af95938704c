"""Checkpoints: the train state and the Grain iterator state, saved together by Orbax.

One `CheckpointManager` under `<run_dir>/checkpoints`, async, keeping the last N. The
data iterator's position is part of every checkpoint, so a resumed run continues with
exactly the batches the uninterrupted run would have seen (invariant 6). Restoring
takes abstract arrays carrying the target shardings, so a checkpoint lands directly on
the current mesh.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from jaxsft.config import CheckpointConfig


class Checkpointer:
    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig):
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            save_interval_steps=cfg.every,
            enable_async_checkpointing=cfg.async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints", options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
        """Saves when `step` is on the interval (or `force`); returns whether it did."""
        if not self.cfg.enabled:
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores the state onto the shardings of `abstract_state`; moves the iterator in place."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        )
        return self.manager.restore(step, args=args).state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs with the shardings of a tree of arrays (the restore target)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def read_state(run_dir: str | Path, step: int | None = None):
    """The train state of a checkpoint as host arrays (latest step by default), for tools and tests."""
    manager = ocp.CheckpointManager(Path(run_dir).absolute() / "checkpoints",
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return restored.state
