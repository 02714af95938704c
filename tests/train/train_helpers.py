"""Tiny models, hand-built batches and sharded train states for the train/ tests.

A module of its own name (not conftest): `from conftest import ...` would resolve to
whichever directory's conftest pytest happened to import last.
"""

import jax
import numpy as np

from jaxsft.config import Config, MeshConfig, ModelConfig, OptimConfig
from jaxsft.train import sharding, state as state_lib
from jaxsft.train.optim import make_optimizer, schedule
from jaxsft.train.step import make_train_step

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
    """A train state and compiled step on a mesh, for comparing meshes and batch splits."""

    def __init__(self, mesh_cfg: MeshConfig = MeshConfig(), devices=None, micro_batches: int = 1,
                 model: ModelConfig = TINY_MODEL, steps: int = 10,
                 optim: OptimConfig = OptimConfig(learning_rate=1e-2, warmup_steps=0)):
        self.cfg = Config(model=model, mesh=mesh_cfg, optim=optim)
        self.mesh = sharding.make_mesh(mesh_cfg, devices)
        self.optimizer = make_optimizer(self.cfg.optim, steps)
        rules = self.cfg.mesh.rules
        self.plan = state_lib.plan(model, VOCAB, self.optimizer, rules, self.mesh, seed=0)
        self.batch_sharding = sharding.batch_sharding(rules, self.mesh)
        self.state = state_lib.create(model, VOCAB, self.optimizer, self.plan, seed=0)
        step = make_train_step(self.plan.graphdef, self.optimizer, schedule(self.cfg.optim, steps), micro_batches)
        with jax.set_mesh(self.mesh):
            self.step = jax.jit(step, in_shardings=(self.plan.shardings, self.batch_sharding),
                                out_shardings=(self.plan.shardings, None))

    def run(self, batches):
        losses = []
        for batch in batches:
            with jax.set_mesh(self.mesh):
                self.state, metrics = self.step(self.state, sharding.global_batch(batch, self.batch_sharding))
            losses.append(float(metrics["loss"]))
        return losses
