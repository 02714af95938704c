"""The optimizer: global-norm clipping, then AdamW under warmup + cosine decay.

Weight decay applies to matrices only: never to norm scales or the embedding table
(decaying an embedding pulls rare tokens towards zero, which is not regularisation).
"""

import jax
import optax

from jaxsft.config import OptimConfig

NO_DECAY_NAMES = ("norm", "embed")


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
    """True where weight decay applies: a parameter whose path names no norm or embedding."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(n in _path_names(path) for n in NO_DECAY_NAMES), params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
