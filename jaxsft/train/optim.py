"""The optimizer: global-norm clipping, then AdamW under warmup + cosine decay.

Weight decay applies to matrices only: never to norm scales, biases (Qwen2's q/k/v, as the
Hugging Face Trainer excludes them) or the embedding table (decaying an embedding pulls rare
tokens towards zero, which is not regularisation). Matched by name: stacked layers make a
bias two-dimensional.

`optim.moments_dtype: bfloat16` stores both Adam moments in bf16 (half the optimizer
bytes); the update itself is computed in float32 and only the stored moments are rounded.
"""

import jax
import jax.numpy as jnp
import optax

from jaxsft.config import OptimConfig

NO_DECAY_NAMES = ("norm", "embed", "bias")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.end_learning_rate_ratio,
    )


def _path_names(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path).lower()


def decay_mask(params):
    """True where weight decay applies: a parameter whose path names no norm, bias or embedding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(n in _path_names(path) for n in NO_DECAY_NAMES), params
    )


def scale_by_adam(cfg: OptimConfig) -> optax.GradientTransformation:
    """optax's Adam scaling with both moments stored in `cfg.moments_dtype`, whatever the
    params' dtype (float32 moments for bfloat16 params too).

    optax takes `mu_dtype` only; its update keeps `nu` in the dtype `nu` was created with
    (computing in float32 because the moment it reads is promoted), so creating `nu` in the
    chosen dtype is all it takes. A test holds the dtypes after an update.
    """
    dtype = jnp.dtype(cfg.moments_dtype)
    adam = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, mu_dtype=dtype)

    def init(params):
        state = adam.init(params)
        return state._replace(nu=jax.tree.map(lambda v: v.astype(dtype), state.nu))

    return optax.GradientTransformation(init, adam.update)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    # The inner chain is optax.adamw spelled out (same state tree) to choose the moments' dtype.
    adamw = optax.chain(
        scale_by_adam(cfg),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
        optax.scale_by_learning_rate(schedule(cfg, total_steps)),
    )
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
