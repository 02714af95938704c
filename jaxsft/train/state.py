"""Building the train state directly on the mesh.

Nothing is ever materialised on one device and then moved: the model is traced with
`nnx.eval_shape` to learn its shapes and logical axis names, those names become
`NamedSharding`s through the config's rules, and the initialiser runs under `jax.jit`
with those shardings as outputs, so each device computes only its own shard. The same
abstract tree (shapes + shardings) is the target when a checkpoint is restored.

With parameter-efficient fine-tuning (model/peft.py) the train state's `params` are the
trainable part only (LoRA/DoRA adapters, or the params a `freeze` selection trains);
the frozen rest lives outside the state (`plan.frozen_shardings`), has no optimizer
state and is never checkpointed: a run's config names its base (`model.init_from`, or
the seed), and the frozen tree is rebuilt from that base on resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsft.config import LogicalRules, ModelConfig
from jaxsft.model import peft
from jaxsft.model.transformer import Transformer
from jaxsft.train import sharding
from jaxsft.train.step import init_state


@dataclasses.dataclass
class StatePlan:
    graphdef: Any
    shardings: Any  # NamedSharding tree matching the train state
    abstract: Any  # ShapeDtypeStruct tree with shardings (restore target)
    full_shardings: Any  # shardings of the whole model's params (what a base is loaded onto)
    frozen_shardings: Any = None  # PEFT: shardings of the frozen params (not in the state)
    frozen_abstract: Any = None  # PEFT: their ShapeDtypeStructs with those shardings
    peft: bool = False


def _abstract_model(cfg: ModelConfig, vocab_size: int, seed: int):
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, vocab_size, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(model)
    specs = nnx.get_partition_spec(state).to_pure_dict()
    return graphdef, state.to_pure_dict(), specs


def _with_sharding(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def plan(cfg: ModelConfig, vocab_size: int, optimizer: optax.GradientTransformation,
         rules: LogicalRules, mesh: Mesh, seed: int) -> StatePlan:
    graphdef, full_abstract, specs = _abstract_model(cfg, vocab_size, seed)
    specs = jax.tree.map(lambda s: s if isinstance(s, P) else P(), specs,
                         is_leaf=lambda s: isinstance(s, P) or s is None)
    full_shardings = sharding.tree_shardings(full_abstract, specs, rules, mesh)
    frozen_shardings = frozen_abstract = None
    abstract_params, param_shardings = full_abstract, full_shardings
    if peft.enabled(cfg.peft):
        abstract_params, frozen_abstract = jax.eval_shape(lambda p: peft.init(cfg.peft, p, jax.random.key(0)),
                                                          full_abstract)
        trainable_specs, frozen_specs = peft.split_specs(cfg.peft, specs, full_abstract)
        param_shardings = sharding.tree_shardings(abstract_params, trainable_specs, rules, mesh)
        frozen_shardings = sharding.tree_shardings(frozen_abstract, frozen_specs, rules, mesh)
        frozen_abstract = _with_sharding(frozen_abstract, frozen_shardings)
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
    # Optimizer moments mirror the params they belong to; counters are replicated.
    state_shardings = {
        "step": NamedSharding(mesh, P()),
        "params": param_shardings,
        "opt_state": optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"],
                                           param_shardings, transform_non_params=lambda _: NamedSharding(mesh, P())),
    }
    return StatePlan(graphdef, state_shardings, _with_sharding(abstract_state, state_shardings), full_shardings,
                     frozen_shardings, frozen_abstract, peft.enabled(cfg.peft))


def init_params(cfg: ModelConfig, vocab_size: int, seed: int):
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, vocab_size, rngs=nnx.Rngs(seed))
    return nnx.state(model).to_pure_dict()


def create(cfg: ModelConfig, vocab_size: int, optimizer: optax.GradientTransformation,
           state_plan: StatePlan, seed: int):
    """Full fine-tuning: initialises params and optimizer state, each device computing only its shard."""
    return jax.jit(lambda: init_state(init_params(cfg, vocab_size, seed), optimizer),
                   out_shardings=state_plan.shardings)()


def create_base(cfg: ModelConfig, vocab_size: int, state_plan: StatePlan, seed: int):
    """A PEFT run's base when no `model.init_from` names one: the seed's random init, on the mesh."""
    return jax.jit(lambda: init_params(cfg, vocab_size, seed), out_shardings=state_plan.full_shardings)()


def split_base(cfg: ModelConfig, base, state_plan: StatePlan, seed: int):
    """(fresh trainable params, frozen params) of a PEFT run from its base, each on its shardings.

    LoRA/DoRA donate the base: the frozen tree is the base itself, in the same buffers."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    return jax.jit(lambda p: peft.init(cfg.peft, p, key), donate_argnums=0 if cfg.peft.adapters else (),
                   out_shardings=(state_plan.shardings["params"], state_plan.frozen_shardings))(base)


def frozen_part(cfg: ModelConfig, base, state_plan: StatePlan):
    """The frozen params alone, on their shardings: a run whose trainable part comes from elsewhere
    (a checkpoint, a PEFT adapter) builds no fresh one."""
    return jax.jit(lambda p: peft.frozen_of(cfg.peft, p), donate_argnums=0 if cfg.peft.adapters else (),
                   out_shardings=state_plan.frozen_shardings)(base)


def from_params(params, optimizer: optax.GradientTransformation, state_plan: StatePlan):
    """The train state around params already on the mesh (e.g. imported from Hugging Face)."""
    return jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_plan.shardings,
                   donate_argnums=0)(params)


BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "loss_weights": jnp.float32,
                "segment_ids": jnp.int32, "positions": jnp.int32}


def compile_step(fn, state_plan: StatePlan, batch_sharding, rows: int, length: int, *, train: bool = True):
    """`fn` compiled ahead of time against abstract arguments with their shardings.

    train: `fn(state, batch, *frozen) -> (state, metrics)`, the state donated; else an
    eval step `fn(params, batch, *frozen)`. `frozen` is the PEFT frozen tree when there is
    one. Call under the mesh and the logical axis rules the step was traced for.
    """
    batch = {k: jax.ShapeDtypeStruct((rows, length), dtype, sharding=batch_sharding) for k, dtype in BATCH_DTYPES.items()}
    frozen_shardings, frozen = ((state_plan.frozen_shardings,), (state_plan.frozen_abstract,)) if state_plan.peft \
        else ((), ())
    if train:
        return jax.jit(fn, in_shardings=(state_plan.shardings, batch_sharding, *frozen_shardings),
                       out_shardings=(state_plan.shardings, None), donate_argnums=0
                       ).lower(state_plan.abstract, batch, *frozen).compile()
    return jax.jit(fn, in_shardings=(state_plan.shardings["params"], batch_sharding, *frozen_shardings)
                   ).lower(state_plan.abstract["params"], batch, *frozen).compile()
