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
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.config import Config, ConfigError, LogicalRules, ModelConfig, PeftConfig
from jaxsft.model import hf_peft, lora, peft, pretrained, prompts, quant
from jaxsft.model.transformer import Transformer, abstract_model
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


def _abstract_model(cfg: ModelConfig, vocab_size: int):
    graphdef, state = nnx.split(abstract_model(cfg, vocab_size))
    specs = nnx.get_partition_spec(state).to_pure_dict()
    return graphdef, state.to_pure_dict(), specs


def _with_sharding(abstract, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def plan(
    cfg: ModelConfig, vocab_size: int, optimizer: optax.GradientTransformation, rules: LogicalRules, mesh: Mesh
) -> StatePlan:
    peft.check(cfg)  # a PEFT method this model cannot run: one line, before anything is traced
    graphdef, full_abstract, specs = _abstract_model(cfg, vocab_size)
    specs = jax.tree.map(
        lambda s: s if isinstance(s, P) else P(), specs, is_leaf=lambda s: isinstance(s, P) or s is None
    )
    full_shardings = sharding.tree_shardings(full_abstract, specs, rules, mesh)
    frozen_shardings = frozen_abstract = None
    abstract_params, param_shardings = full_abstract, full_shardings
    if peft.enabled(cfg.peft):
        abstract_params, frozen_abstract = jax.eval_shape(
            lambda p: peft.init(cfg.peft, p, jax.random.key(0)), full_abstract
        )
        trainable_specs, frozen_specs = peft.split_specs(cfg.peft, specs, full_abstract)
        param_shardings = sharding.tree_shardings(abstract_params, trainable_specs, rules, mesh)
        frozen_shardings = sharding.tree_shardings(frozen_abstract, frozen_specs, rules, mesh)
        frozen_abstract = _with_sharding(frozen_abstract, frozen_shardings)
    abstract_state = jax.eval_shape(lambda p: init_state(p, optimizer), abstract_params)
    # Optimizer moments mirror the params they belong to; counters are replicated.
    state_shardings = {
        "step": NamedSharding(mesh, P()),
        "params": param_shardings,
        "opt_state": optax.tree_map_params(
            optimizer,
            lambda _, s: s,
            abstract_state["opt_state"],
            param_shardings,
            transform_non_params=lambda _: NamedSharding(mesh, P()),
        ),
    }
    return StatePlan(
        graphdef,
        state_shardings,
        _with_sharding(abstract_state, state_shardings),
        full_shardings,
        frozen_shardings,
        frozen_abstract,
        peft.enabled(cfg.peft),
    )


def init_params(cfg: ModelConfig, vocab_size: int, seed: int):
    with nnx.use_eager_sharding(False):
        model = Transformer(cfg, vocab_size, rngs=nnx.Rngs(seed))
    return nnx.state(model).to_pure_dict()


def create(
    cfg: ModelConfig, vocab_size: int, optimizer: optax.GradientTransformation, state_plan: StatePlan, seed: int
):
    """Full fine-tuning: initialises params and optimizer state, each device computing only its shard."""
    return jax.jit(
        lambda: init_state(init_params(cfg, vocab_size, seed), optimizer), out_shardings=state_plan.shardings
    )()


def base_params(cfg: ModelConfig, vocab_size: int, shardings, seed: int):
    """The whole model's params a run starts from, on `shardings`: `model.init_from`'s weights
    (Hugging Face or Orbax), else the seed's random init. A PEFT run's base; export rebuilds
    the same base to merge adapters onto. QLoRA (`model.peft.quantize`): the base comes
    quantised (model/quant.py) and `shardings` are laid out like it."""
    if cfg.init_from:
        return pretrained.load_pretrained(cfg, vocab_size, shardings)
    return jax.jit(lambda: quant.quantize_base(init_params(cfg, vocab_size, seed), cfg.peft), out_shardings=shardings)()


def create_base(cfg: ModelConfig, vocab_size: int, state_plan: StatePlan, seed: int):
    """A run's base (`base_params`) on the whole model's shardings of `state_plan` (QLoRA: the
    frozen tree's, which is the quantised base)."""
    quantized = cfg.peft.quantize != "none"
    return base_params(cfg, vocab_size, state_plan.frozen_shardings if quantized else state_plan.full_shardings, seed)


def split_base(cfg: ModelConfig, base, state_plan: StatePlan, seed: int, prompt_ids=()):
    """(fresh trainable params, frozen params) of a PEFT run from its base, each on its shardings.

    LoRA/DoRA donate the base: the frozen tree is the base itself, in the same buffers.
    `prompt_ids`: prompt tuning's `prompt_init_text` as token ids."""
    key = jax.random.fold_in(jax.random.key(seed), 1)
    return jax.jit(
        lambda p: peft.init(cfg.peft, p, key, tuple(prompt_ids), prompts.embed_scale(cfg)),
        donate_argnums=0 if cfg.peft.adapters else (),
        out_shardings=(state_plan.shardings["params"], state_plan.frozen_shardings),
    )(base)


def frozen_part(cfg: ModelConfig, base, state_plan: StatePlan):
    """The frozen params alone, on their shardings: a run whose trainable part comes from elsewhere
    (a checkpoint, a PEFT adapter) builds no fresh one."""
    return jax.jit(
        lambda p: peft.frozen_of(cfg.peft, p),
        donate_argnums=0 if cfg.peft.adapters else (),
        out_shardings=state_plan.frozen_shardings,
    )(base)


def from_params(params, optimizer: optax.GradientTransformation, state_plan: StatePlan):
    """The train state around params already on the mesh (e.g. imported from Hugging Face)."""
    return jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_plan.shardings, donate_argnums=0)(params)


def initial_state(
    cfg: Config,
    vocab_size: int,
    optimizer: optax.GradientTransformation,
    state_plan: StatePlan,
    restored=None,
    prompt_ids=(),
):
    """(train state, frozen argument tuple) a run starts from. The first source that exists wins:

    1. `restored`: the run's own checkpoint. It holds the trainable state only; a PEFT run's
       frozen part is rebuilt from the base of 3 or 4, which checkpoints never hold.
    2. `model.peft.init_from`: a Hugging Face PEFT adapter is the trainable part, on the base of 3 or 4.
    3. `model.init_from`: Hugging Face or Orbax weights are the base.
    4. `train.seed`: the seed's random init is the base.

    Full fine-tuning trains the whole base; a PEFT run trains `peft.init`'s part of it and
    passes the rest as the frozen argument of every step (`()` without PEFT). `prompt_ids`:
    `model.peft.prompt_init_text` as the run's tokenizer encodes it (prompt tuning, 4 only).
    """
    model, seed = cfg.model, cfg.train.seed
    if not state_plan.peft:
        if restored is not None:
            return restored, ()
        if model.init_from:
            return from_params(
                base_params(model, vocab_size, state_plan.full_shardings, seed), optimizer, state_plan
            ), ()
        return create(model, vocab_size, optimizer, state_plan, seed), ()
    base = create_base(model, vocab_size, state_plan, seed)
    if restored is not None:
        return restored, (frozen_part(model, base, state_plan),)
    if model.peft.init_from:
        frozen = frozen_part(model, base, state_plan)
        return from_params(peft_adapters(model.peft, state_plan), optimizer, state_plan), (frozen,)
    if model.peft.prompt_init_text and not prompt_ids:
        raise ConfigError("model.peft.prompt_init_text: the text encodes to no token ids")
    trainable, frozen = split_base(model, base, state_plan, seed, prompt_ids)
    return from_params(trainable, optimizer, state_plan), (frozen,)


def peft_adapters(pe: PeftConfig, state_plan: StatePlan):
    """The adapters of `model.peft.init_from` (a HF PEFT directory), placed on the adapters' shardings."""
    if not peft.mergeable(pe):  # bottleneck adapters (our files), prefix / prompt tuning (HF PEFT)
        return jax.device_put(peft.load(pe, pe.init_from, state_plan.frozen_abstract), state_plan.shardings["params"])
    peft_cfg, adapters = hf_peft.load_peft(pe.init_from, state_plan.frozen_abstract)
    if (peft_cfg.method, peft_cfg.rank, set(lora.target_paths(peft_cfg))) != (
        pe.method,
        pe.rank,
        set(lora.target_paths(pe)),
    ):
        raise ConfigError(
            f"model.peft.init_from={pe.init_from}: {peft_cfg.method} rank {peft_cfg.rank} on "
            f"{list(peft_cfg.targets)}; set model.peft.method, rank and targets to match"
        )
    return jax.device_put(adapters, state_plan.shardings["params"])


def drift_anchor(cfg: Config, vocab_size: int, state_plan: StatePlan, start_params=None, prompt_ids=()) -> tuple:
    """`(theta_0,)`, the drift penalty's anchor, or `()` when `optim.drift_penalty` is 0.

    theta_0 is the trainable params a fresh run starts from (`initial_state` without a
    checkpoint), stored in `optim.drift_anchor_dtype` on the params' shardings. A fresh run
    passes its `start_params` (copied: the state is donated to the step); a resumed run
    rebuilds them from the same sources in the same order (`model.peft.init_from`,
    `model.init_from`, the seed; `prompt_ids` as for `initial_state`), which is why
    checkpoints never hold the anchor.
    """
    if not cfg.optim.drift_penalty:
        return ()
    dtype = jax.numpy.dtype(cfg.optim.drift_anchor_dtype)
    # jnp.array(copy=True) binds a copy: jit would otherwise forward an unchanged input as the output.
    anchor_of = jax.jit(
        lambda p: jax.tree.map(lambda x: jax.numpy.array(x, dtype=dtype, copy=True), p),
        out_shardings=state_plan.shardings["params"],
    )
    if start_params is None:
        start_params = _fresh_trainable(cfg, vocab_size, state_plan, prompt_ids)
    return (anchor_of(start_params),)


def _fresh_trainable(cfg: Config, vocab_size: int, state_plan: StatePlan, prompt_ids=()):
    """The trainable params of `initial_state` with nothing restored (its steps 2-4), without an
    optimizer state; the frozen part built on the way is dropped."""
    model, seed = cfg.model, cfg.train.seed
    if not state_plan.peft:
        return base_params(model, vocab_size, state_plan.full_shardings, seed)
    if model.peft.init_from:
        return peft_adapters(model.peft, state_plan)
    return split_base(model, create_base(model, vocab_size, state_plan, seed), state_plan, seed, prompt_ids)[0]
