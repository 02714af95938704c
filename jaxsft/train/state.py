"""Building the train state directly on the mesh.

Nothing is ever materialised on one device and then moved: the model is traced with
`nnx.eval_shape` to learn its shapes and logical axis names, those names become
`NamedSharding`s through the config's rules, and the initialiser runs under `jax.jit`
with those shardings as outputs, so each device computes only its own shard. The same
abstract tree (shapes + shardings) is the target when a checkpoint is restored.

With LoRA the train state's `params` are the adapters only; the frozen base lives
outside the state (`plan.base_shardings`), so it has no optimizer state and is never
checkpointed: a run's config names its base (`model.init_from`, or the seed).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxsft.config import LogicalRules, LoraConfig, ModelConfig
from jaxsft.model import lora
from jaxsft.model.transformer import Transformer
from jaxsft.train import sharding
from jaxsft.train.step import init_state


@dataclasses.dataclass
class StatePlan:
    graphdef: Any
    shardings: Any  # NamedSharding tree matching the train state
    abstract: Any  # ShapeDtypeStruct tree with shardings (restore target)
    base_shardings: Any = None  # LoRA: shardings of the frozen base params (not in the state)
    base_abstract: Any = None  # LoRA: the base's ShapeDtypeStructs with those shardings
    lora_cfg: LoraConfig | None = None


def _abstract_model(cfg: ModelConfig, vocab_size: int, seed: int):
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: Transformer(cfg, vocab_size, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(model)
    specs = nnx.get_partition_spec(state).to_pure_dict()
    return graphdef, state.to_pure_dict(), specs


def _with_sharding(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def plan(cfg: ModelConfig, vocab_size: int, optimizer: optax.GradientTransformation,
         rules: LogicalRules, mesh: Mesh, seed: int, lora_cfg: LoraConfig = LoraConfig()) -> StatePlan:
    graphdef, abstract_params, specs = _abstract_model(cfg, vocab_size, seed)
    specs = jax.tree.map(lambda s: s if isinstance(s, P) else P(), specs,
                         is_leaf=lambda s: isinstance(s, P) or s is None)
    param_shardings = sharding.tree_shardings(abstract_params, specs, rules, mesh)
    base_shardings, lora_used = None, lora_cfg if lora_cfg.enabled else None
    if lora_used:
        base_shardings, base_abstract = param_shardings, abstract_params
        abstract_params = jax.eval_shape(lambda: lora.init_adapters(base_abstract, lora_cfg, jax.random.key(0)))
        specs = lora.adapter_specs(specs, base_abstract, lora_cfg)
        param_shardings = sharding.tree_shardings(abstract_params, specs, rules, mesh)
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
    # Optimizer moments mirror the params they belong to; counters are replicated.
    state_shardings = {
        "step": NamedSharding(mesh, P()),
        "params": param_shardings,
        "opt_state": optax.tree_map_params(optimizer, lambda _, s: s, abstract_state["opt_state"],
                                           param_shardings, transform_non_params=lambda _: NamedSharding(mesh, P())),
    }
    base_abstract = _with_sharding(base_abstract, base_shardings) if lora_used else None
    return StatePlan(graphdef, state_shardings, _with_sharding(abstract_state, state_shardings), base_shardings,
                     base_abstract, lora_used)


def init_params(cfg: ModelConfig, vocab_size: int, seed: int):
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, vocab_size, rngs=nnx.Rngs(seed))
    return nnx.state(model).to_pure_dict()


def create(cfg: ModelConfig, vocab_size: int, optimizer: optax.GradientTransformation,
           state_plan: StatePlan, seed: int):
    """Initialises params (LoRA: the adapters) and optimizer state, each device computing only its shard."""
    def init():
        if state_plan.lora_cfg is None:
            return init_state(init_params(cfg, vocab_size, seed), optimizer)
        base = jax.eval_shape(lambda: init_params(cfg, vocab_size, seed))
        adapters = lora.init_adapters(base, state_plan.lora_cfg, jax.random.fold_in(jax.random.key(seed), 1))
        return init_state(adapters, optimizer)
    return jax.jit(init, out_shardings=state_plan.shardings)()


def create_base(cfg: ModelConfig, vocab_size: int, state_plan: StatePlan, seed: int):
    """LoRA's frozen base when no `model.init_from` names one: the seed's random init, on the mesh."""
    return jax.jit(lambda: init_params(cfg, vocab_size, seed), out_shardings=state_plan.base_shardings)()


def from_params(params, optimizer: optax.GradientTransformation, state_plan: StatePlan):
    """The train state around params already on the mesh (e.g. imported from Hugging Face)."""
    return jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_plan.shardings,
                   donate_argnums=0)(params)
