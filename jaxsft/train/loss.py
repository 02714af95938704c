"""Masked cross-entropy that returns a (weighted sum, total weight) pair, never a mean.

Normalising is the caller's job and happens once per optimizer step over every
micro-batch and device (DESIGN invariant 5): a mean per micro-batch would weight a
token by how full its micro-batch happened to be.

`chunked_cross_entropy_sum` takes the final hidden states and the output head instead of
logits and computes the same pair a chunk of tokens at a time, so the `[B, T, V]` float32
logits (often the largest tensor of a fine-tuning step) never exist, forward or backward.

Shape suffixes follow the key in jaxsft/model/__init__.py (here M: the B*T tokens
flattened, C: chunks, E: tokens in one chunk).
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


def _softcap(logits, cap: float):
    return cap * jnp.tanh(logits / cap) if cap else logits


def _chunk_nll_sum(hidden_ExD, head_DxV, targets_E, weights_E, softcap: float, dtype):
    logits_ExV = jnp.dot(hidden_ExD.astype(dtype), head_DxV.astype(dtype), preferred_element_type=jnp.float32)
    logits_ExV = _softcap(logits_ExV.astype(jnp.float32), softcap)
    target_logit_E = jnp.take_along_axis(logits_ExV, targets_E[:, None], axis=-1)[:, 0]
    nll_E = jnp.where(weights_E > 0, jax.nn.logsumexp(logits_ExV, axis=-1) - target_logit_E, 0.0)
    return jnp.sum(nll_E * weights_E)


def chunked_cross_entropy_sum(hidden_BxTxD: jax.Array, head_DxV: jax.Array, targets_BxT: jax.Array,
                              weights_BxT: jax.Array, chunk: int, softcap: float = 0.0, dtype=jnp.float32):
    """`cross_entropy_sum(softcap(hidden @ head), targets, weights)` without the full logits.

    The B*T tokens are split into chunks of `chunk` tokens; a `scan` computes one chunk's
    float32 logits at a time, and `jax.checkpoint` makes the backward pass recompute them
    rather than keep every chunk's (peak: one [chunk, V] block, plus XLA's workspace).
    `dtype` is the matmul's input dtype (the model's compute dtype); it accumulates in f32.

    Chunk c holds tokens c, c + C, c + 2C, ... of M (C chunks), not a contiguous run: the token
    axis is sharded over devices in contiguous blocks, so strided chunks give every device
    its own share of each chunk and the scan needs no communication.
    """
    depth = hidden_BxTxD.shape[-1]
    hidden_MxD = hidden_BxTxD.reshape(-1, depth)
    targets_M, weights_M = targets_BxT.reshape(-1), weights_BxT.reshape(-1).astype(jnp.float32)
    pad = -hidden_MxD.shape[0] % chunk
    if pad:  # zero weight: padding adds nothing to either sum
        hidden_MxD = jnp.pad(hidden_MxD, ((0, pad), (0, 0)))
        targets_M, weights_M = jnp.pad(targets_M, (0, pad)), jnp.pad(weights_M, (0, pad))
    chunks = hidden_MxD.shape[0] // chunk
    hidden_CxExD = hidden_MxD.reshape(chunk, chunks, depth).swapaxes(0, 1)
    targets_CxE, weights_CxE = (x.reshape(chunk, chunks).swapaxes(0, 1) for x in (targets_M, weights_M))
    chunk_sum = jax.checkpoint(_chunk_nll_sum, static_argnums=(4, 5))

    def body(total, xs):
        hidden_ExD, targets_E, weights_E = xs
        return total + chunk_sum(hidden_ExD, head_DxV, targets_E, weights_E, softcap, dtype), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden_CxExD, targets_CxE, weights_CxE))
    return total, jnp.sum(weights_M)
