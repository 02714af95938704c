"""Masked cross-entropy that returns a (weighted sum, total weight) pair, never a mean.

Normalising is the caller's job and happens once per optimizer step over every
micro-batch and device (DESIGN invariant 5): a mean per micro-batch would weight a
token by how full its micro-batch happened to be.
"""

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array):
    """Returns (sum of weight * -log p(target), sum of weights), both float32 scalars."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    log_z_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    weights_BxT = weights_BxT.astype(jnp.float32)
    # where() rather than a product so a non-finite logit at an untrained position cannot leak.
    nll_BxT = jnp.where(weights_BxT > 0, log_z_BxT - target_logit_BxT, 0.0)
    return jnp.sum(nll_BxT * weights_BxT), jnp.sum(weights_BxT)
