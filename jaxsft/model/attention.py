"""Attention backends behind one function.

Job: softmax(q k^T / sqrt(H)) v over a packed batch, where a query may only see keys
that come no later in the row (causal by index) AND belong to the same segment.

Contract:
    attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, *, implementation='xla')
        -> out_BxTxNxH   (dtype of q)

- Grouped-query attention: N query heads share K kv heads, query head n reads kv head
  n // (N // K) (the Hugging Face `repeat_kv` order), so checkpoints map without a shuffle.
- Segment id 0 marks padding. Pads attend among themselves causally, so every query sees
  at least itself and no row is ever all-masked: outputs stay finite (never NaN). Their
  values are garbage by design; the loss gives them zero weight.
- Self-attention over the packed row only: S == T (a KV-cache decode path will need its
  own segment/position inputs and lives with the sampler).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so a masked logit never turns into inf - inf = NaN; exp() of it is exactly 0.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def packed_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """True where query t may attend key s: s <= t and both in the same segment."""
    length = segment_ids_BxT.shape[1]
    causal_TxS = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return causal_TxS[None] & same_segment_BxTxS


def _xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT):
    """Grouped einsum; logits and softmax in float32 whatever the compute dtype."""
    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    # Group query heads under their kv head instead of repeating k/v: no K->N copy.
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    logits_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32)
    logits_BxKxGxTxS = logits_BxKxGxTxS * (h ** -0.5)
    mask_Bx1x1xTxS = packed_causal_mask(segment_ids_BxT)[:, None, None]
    logits_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, logits_BxKxGxTxS, _MASKED_LOGIT)
    probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS.astype(v_BxSxKxH.dtype), v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


IMPLEMENTATIONS = {"xla": _xla_attention}


def _check_shapes(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT) -> None:
    b, t, n, h = q_BxTxNxH.shape
    if k_BxSxKxH.shape != v_BxSxKxH.shape:
        raise ValueError(f"attention: k shape {k_BxSxKxH.shape} differs from v shape {v_BxSxKxH.shape}")
    kb, s, kv_heads, kh = k_BxSxKxH.shape
    if (kb, s, kh) != (b, t, h):
        raise ValueError(f"attention: q shape {q_BxTxNxH.shape} and k shape {k_BxSxKxH.shape} must agree on "
                         "batch, length and head_dim (self-attention over the packed row)")
    if n % kv_heads:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kv_heads} kv heads")
    if segment_ids_BxT.shape != (b, t):
        raise ValueError(f"attention: segment_ids shape {segment_ids_BxT.shape}, expected {(b, t)}")


def attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
              segment_ids_BxT: jax.Array, *, implementation: str = "xla") -> jax.Array:
    """Causal, segment-masked grouped-query attention; see the module docstring."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not supported; "
                         f"supported: {', '.join(IMPLEMENTATIONS)}")
    _check_shapes(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    return IMPLEMENTATIONS[implementation](q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
