"""The one builder of the compiled train program: config + vocabulary + mesh -> steps.

`build(cfg, vocab_size, mesh)` is the recipe optimizer -> state plan -> batch sharding
-> train/eval step functions, and `Program.compile()` lowers them under the mesh and the
logical axis rules. `jaxsft train`, `jaxsft compile` (the pre-flight), the benches and
the tests all build their step here, so the pre-flight reports the memory of exactly the
program that training runs (micro-batch sharding constraint, PEFT frozen argument,
chunked loss, remat and all).

Contract:
    program = build(cfg, vocab_size, mesh)
    program.compile() -> Compiled(train, eval): AOT-compiled against abstract inputs
        train(state, batch, *frozen, *anchor) -> (state, metrics), the state donated
        eval(params, batch, *frozen) -> (loss sum, weight sum)
    program.jit_train(donate=...) -> the same train step as a `jax.jit` function
    `frozen` is `(frozen params,)` for a PEFT run and `()` otherwise; `anchor` is
    `(theta_0,)` (state.drift_anchor) when `optim.drift_penalty` > 0 and `()` otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.config import Config, ConfigError
from jaxsft.train import sharding
from jaxsft.train import state as state_lib
from jaxsft.train.optim import make_optimizer, schedule
from jaxsft.train.step import make_eval_step, make_train_step

BATCH_DTYPES = {
    "inputs": jnp.int32,
    "targets": jnp.int32,
    "loss_weights": jnp.float32,
    "segment_ids": jnp.int32,
    "positions": jnp.int32,
}


class Compiled(NamedTuple):
    train: Any
    eval: Any


@dataclasses.dataclass
class Program:
    cfg: Config
    vocab_size: int
    mesh: Mesh
    optimizer: optax.GradientTransformation
    plan: state_lib.StatePlan
    batch_sharding: NamedSharding
    train_fn: Callable  # pure: (state, batch, *frozen, *anchor) -> (state, metrics)
    eval_fn: Callable  # pure: (params, batch, frozen=None) -> (loss sum, weight sum)

    @contextlib.contextmanager
    def context(self):
        """The mesh and logical axis rules the steps are traced under."""
        with jax.set_mesh(self.mesh), linen.logical_axis_rules(sharding.flax_rules(self.cfg.mesh.rules)):
            yield

    @property
    def _frozen_shardings(self) -> tuple:
        return (self.plan.frozen_shardings,) if self.plan.peft else ()

    @property
    def frozen_abstract(self) -> tuple:
        return (self.plan.frozen_abstract,) if self.plan.peft else ()

    @property
    def anchor_abstract(self) -> tuple:
        """`(theta_0's ShapeDtypeStructs,)` with a drift penalty: the trainable params' shapes and
        shardings in `optim.drift_anchor_dtype`; `()` without."""
        if not self.cfg.optim.drift_penalty:
            return ()
        dtype = jnp.dtype(self.cfg.optim.drift_anchor_dtype)
        params = self.plan.abstract["params"]
        return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding), params),)

    def jit_train(self, *, donate: bool = True):
        anchor_shardings = (self.plan.shardings["params"],) if self.anchor_abstract else ()
        return jax.jit(
            self.train_fn,
            in_shardings=(self.plan.shardings, self.batch_sharding, *self._frozen_shardings, *anchor_shardings),
            out_shardings=(self.plan.shardings, None),
            donate_argnums=0 if donate else (),
        )

    def jit_eval(self):
        return jax.jit(
            self.eval_fn, in_shardings=(self.plan.shardings["params"], self.batch_sharding, *self._frozen_shardings)
        )

    def abstract_batch(self, rows: int | None = None, length: int | None = None) -> dict:
        rows = rows or self.cfg.train.global_batch_size
        length = length or self.cfg.data.max_length
        return {
            k: jax.ShapeDtypeStruct((rows, length), dtype, sharding=self.batch_sharding)
            for k, dtype in BATCH_DTYPES.items()
        }

    def lower_train(self, rows: int | None = None, length: int | None = None):
        with self.context():
            return self.jit_train().lower(
                self.plan.abstract, self.abstract_batch(rows, length), *self.frozen_abstract, *self.anchor_abstract
            )

    def compile_train(self, rows: int | None = None, length: int | None = None):
        return self.lower_train(rows, length).compile()

    def compile_eval(self, rows: int | None = None, length: int | None = None):
        with self.context():
            return (
                self.jit_eval()
                .lower(self.plan.abstract["params"], self.abstract_batch(rows, length), *self.frozen_abstract)
                .compile()
            )

    def compile(self, rows: int | None = None, length: int | None = None) -> Compiled:
        """Both steps compiled ahead of time for `rows` x `length` global batches (default: the config's)."""
        return Compiled(self.compile_train(rows, length), self.compile_eval(rows, length))


def build(cfg: Config, vocab_size: int, mesh: Mesh) -> Program:
    """The train program of `cfg` (model shapes already resolved) on `mesh`; nothing is allocated."""
    t = cfg.train
    optimizer = make_optimizer(cfg.optim, t.steps)
    plan = state_lib.plan(cfg.model, vocab_size, optimizer, cfg.mesh.rules, mesh)
    batch_sharding = sharding.batch_sharding(cfg.mesh.rules, mesh)
    # [M, B/M, T] micro-batches keep the rows' sharding on their second axis.
    micro_sharding = NamedSharding(mesh, P(None, *batch_sharding.spec))
    train_step = make_train_step(
        graphdef=plan.graphdef,
        optimizer=optimizer,
        schedule=schedule(cfg.optim, t.steps),
        micro_batches=t.micro_batches,
        constrain_micro=lambda x: jax.lax.with_sharding_constraint(x, micro_sharding),
        peft_cfg=cfg.model.peft,
        seed=t.seed,
        loss_chunk=t.loss_chunk,
        drift_penalty=cfg.optim.drift_penalty,
    )
    peft_run, drift = plan.peft, bool(cfg.optim.drift_penalty)

    def train_fn(state, batch, *extras):  # exactly the arguments the run has: *frozen, *anchor
        return train_step(state, batch, extras[0] if peft_run else None, extras[-1] if drift else None)

    eval_fn = make_eval_step(graphdef=plan.graphdef, peft_cfg=cfg.model.peft, loss_chunk=t.loss_chunk)
    return Program(cfg, vocab_size, mesh, optimizer, plan, batch_sharding, train_fn, eval_fn)


def check_batch(cfg: Config, mesh: Mesh) -> None:
    """Fails with a config message when the global batch cannot split over the batch shards and micro-batches."""
    t = cfg.train
    shards = sharding.batch_axes_size(cfg.mesh.rules, mesh)
    if t.global_batch_size % (shards * t.micro_batches):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must divide by the batch shards ({shards}) "
            f"x train.micro_batches ({t.micro_batches})"
        )


def vocab_size_without_data(cfg: Config) -> int:
    """The vocabulary a run of `cfg` will have, without reading any data (for the pre-flight):
    `model.vocab_size`, else the Hugging Face tokenizer's (`data.tokenizer: hf:DIR`, or the
    model's own directory), else the SentencePiece tokenizer `data.tokenizer_vocab_size` trains."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    spec = cfg.data.tokenizer
    if not spec and cfg.model.init_from.startswith("hf:"):
        spec = cfg.model.init_from
    if spec:
        from jaxsft.data.tokenizer import load_tokenizer

        return load_tokenizer(spec).vocab_size
    return cfg.data.tokenizer_vocab_size
