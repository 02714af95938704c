"""Tiny models, hand-built batches and sharded train states for the train/ tests.

A module of its own name (not conftest): `from conftest import ...` would resolve to
whichever directory's conftest pytest happened to import last.
"""

import numpy as np

from jaxsft.config import Config, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from jaxsft.train import program as program_lib
from jaxsft.train import sharding
from jaxsft.train import state as state_lib

VOCAB = 64
TINY_MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


def make_batch(rng: np.random.Generator, rows: int, length: int, examples_per_row: int = 2) -> dict:
    """Packed rows of random examples: segment ids from 1, positions restarting, trailing padding."""
    batch = {k: np.zeros((rows, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["loss_weights"] = np.zeros((rows, length), np.float32)
    for r in range(rows):
        start = 0
        for seg in range(1, examples_per_row + 1):
            n = int(rng.integers(4, length // examples_per_row))
            tokens = rng.integers(1, VOCAB, n + 1)
            sl = slice(start, start + n)
            batch["inputs"][r, sl], batch["targets"][r, sl] = tokens[:-1], tokens[1:]
            batch["segment_ids"][r, sl], batch["positions"][r, sl] = seg, np.arange(n)
            batch["loss_weights"][r, sl] = rng.random(n) < 0.6
            start += n
    return batch


class Setup:
    """A train state and its jitted step from the one program builder (train/program.py), on a
    mesh, for comparing meshes and batch splits."""

    def __init__(
        self,
        mesh_cfg: MeshConfig = MeshConfig(),
        devices=None,
        micro_batches: int = 1,
        model: ModelConfig = TINY_MODEL,
        steps: int = 10,
        optim: OptimConfig = OptimConfig(learning_rate=1e-2, warmup_steps=0),
    ):
        self.cfg = Config(
            model=model, mesh=mesh_cfg, optim=optim, train=TrainConfig(steps=steps, micro_batches=micro_batches, seed=0)
        )
        self.mesh = sharding.make_mesh(mesh_cfg, devices)
        self.program = program_lib.build(self.cfg, VOCAB, self.mesh)
        self.plan, self.batch_sharding = self.program.plan, self.program.batch_sharding
        self.state, _ = state_lib.initial_state(self.cfg, VOCAB, self.program.optimizer, self.plan)
        # optim.drift_penalty > 0: theta_0 is the start (`()` otherwise, the step unchanged).
        self.anchor = state_lib.drift_anchor(self.cfg, VOCAB, self.plan, self.state["params"])
        self.step = self.program.jit_train(donate=False)

    def run(self, batches):
        losses = []
        for batch in batches:
            with self.program.context():
                self.state, metrics = self.step(
                    self.state, sharding.global_batch(batch, self.batch_sharding), *self.anchor
                )
            losses.append(float(metrics["loss"]))
        return losses
