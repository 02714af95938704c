"""Attention backends behind one function.

Job: softmax(q k^T * scale) v over a packed batch, where a query may only see keys
that come no later in the row (causal by index) AND belong to the same segment.

Contract:
    attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, *, implementation='xla')
        -> out_BxTxNxH   (dtype of q)

- Grouped-query attention: N query heads share K kv heads, query head n reads kv head
  n // (N // K) (the Hugging Face `repeat_kv` order), so checkpoints map without a shuffle.
- Segment id 0 marks padding. Pads attend among themselves causally, so every query sees
  at least itself and no row is ever all-masked: outputs stay finite (never NaN). Their
  values are garbage by design; the loss gives them zero weight.
- `attention` is self-attention over the packed row (S == T); the KV-cache decode path
  builds its own mask from cached positions and calls `masked_attention`.
- Variants: query scale (Gemma 2's query_pre_attn_scalar), logit soft-capping, and a
  sliding window that may differ per layer (a traced scalar under the layer scan).
- A prefix (prefix / prompt tuning, model/prompts.py): W extra keys/values every query of
  every row sees, before its own row's keys, whatever its segment (every segment of a packed
  row sees the same prefix). Only `xla` takes one (`auto` falls back to it).
- Implementations (`model.attention`): `xla` here, the reference, every platform and
  variant, its queries in blocks that skip the keys after them; `cudnn`, `splash`,
  `pallas_gpu` in kernels.py, which refuse in one line what they cannot compute; `auto`
  takes the platform's kernel (tpu: splash, gpu: cudnn) and falls back to xla where that
  kernel refuses this call, and is xla elsewhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsft.model import kernels

# Finite, so a masked logit never turns into inf - inf = NaN; exp() of it is exactly 0.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def packed_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """True where query t may attend key s: s <= t and both in the same segment."""
    length = segment_ids_BxT.shape[1]
    causal_TxS = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return causal_TxS[None] & same_segment_BxTxS


def masked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale: float, softcap: float = 0.0):
    """Grouped einsum under an explicit mask; logits and softmax in float32 whatever the dtype.

    `softcap` > 0 squashes the logits as cap * tanh(logits / cap) (Gemma 2) before masking.
    """
    b, t, n, h = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    # Group query heads under their kv head instead of repeating k/v: no K->N copy.
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    logits_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    logits_BxKxGxTxS = logits_BxKxGxTxS * scale
    if softcap:
        logits_BxKxGxTxS = softcap * jnp.tanh(logits_BxKxGxTxS / softcap)
    logits_BxKxGxTxS = jnp.where(mask_BxTxS[:, None, None], logits_BxKxGxTxS, _MASKED_LOGIT)
    probs_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS.astype(v_BxSxKxH.dtype), v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


def window_mask(length: int, window) -> jax.Array:
    """True where key s is within `window` of query t (t - s < window); all True for window 0.

    `window` may be a traced scalar (one per layer under scan). Within a segment, index
    distance equals position distance, so this is the Hugging Face sliding window.
    """
    distance_TxS = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    return (window <= 0) | (distance_TxS < window)


# Causal block skipping: queries go in at most this many blocks of at least this many rows.
_MAX_QUERY_BLOCKS = 8
_MIN_QUERY_BLOCK = 64


def query_blocks(length: int) -> list[tuple[int, int]]:
    """[start, end) of each query block; one block for short rows (nothing to skip)."""
    block = max(_MIN_QUERY_BLOCK, -(-length // _MAX_QUERY_BLOCKS))
    return [(start, min(start + block, length)) for start in range(0, length, block)]


def with_prefix(k_BxSxKxH, v_BxSxKxH, mask_BxTxS, prefix):
    """Keys, values and mask with the prefix's W slots first; every query sees all of them."""
    if prefix is None:
        return k_BxSxKxH, v_BxSxKxH, mask_BxTxS
    b, t = mask_BxTxS.shape[:2]
    k_WxKxH, v_WxKxH = prefix
    n = k_WxKxH.shape[0]
    k_BxWxKxH = jnp.broadcast_to(k_WxKxH.astype(k_BxSxKxH.dtype), (b, *k_WxKxH.shape))
    v_BxWxKxH = jnp.broadcast_to(v_WxKxH.astype(v_BxSxKxH.dtype), (b, *v_WxKxH.shape))
    return (
        jnp.concatenate([k_BxWxKxH, k_BxSxKxH], axis=1),
        jnp.concatenate([v_BxWxKxH, v_BxSxKxH], axis=1),
        jnp.concatenate([jnp.ones((b, t, n), bool), mask_BxTxS], axis=2),
    )


def _xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, softcap, window, prefix=None):
    """Queries in blocks, each against the keys up to its own last row only: the blocks above
    the causal diagonal, fully masked, are never computed (with 8 blocks, 9/16 of the dense
    work, forward and backward). Within a block the mask does the rest, exactly as dense."""
    length = segment_ids_BxT.shape[1]
    mask_BxTxS = packed_causal_mask(segment_ids_BxT)
    if window is not None:
        mask_BxTxS = mask_BxTxS & window_mask(length, window)[None]
    outs = [
        masked_attention(
            q_BxTxNxH[:, start:end],
            *with_prefix(k_BxSxKxH[:, :end], v_BxSxKxH[:, :end], mask_BxTxS[:, start:end, :end], prefix),
            scale,
            softcap,
        )
        for start, end in query_blocks(length)
    ]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


IMPLEMENTATIONS = {
    "xla": _xla_attention,
    "cudnn": kernels.cudnn_attention,
    "splash": kernels.splash_attention,
    "pallas_gpu": kernels.pallas_gpu_attention,
}
_PLATFORM_KERNELS = {"tpu": "splash", "gpu": "cudnn"}


def _auto_attention(*args):
    """The platform's kernel where it can compute this call, else xla (trace-time choice)."""
    kernel = IMPLEMENTATIONS[_PLATFORM_KERNELS.get(jax.default_backend(), "xla")]
    try:
        return kernel(*args)
    except kernels.Unsupported:
        return _xla_attention(*args)


IMPLEMENTATIONS["auto"] = _auto_attention


def _check_shapes(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT) -> None:
    b, t, n, h = q_BxTxNxH.shape
    if k_BxSxKxH.shape != v_BxSxKxH.shape:
        raise ValueError(f"attention: k shape {k_BxSxKxH.shape} differs from v shape {v_BxSxKxH.shape}")
    kb, s, kv_heads, kh = k_BxSxKxH.shape
    if (kb, s, kh) != (b, t, h):
        raise ValueError(
            f"attention: q shape {q_BxTxNxH.shape} and k shape {k_BxSxKxH.shape} must agree on "
            "batch, length and head_dim (self-attention over the packed row)"
        )
    if n % kv_heads:
        raise ValueError(f"attention: {n} query heads are not a multiple of {kv_heads} kv heads")
    if segment_ids_BxT.shape != (b, t):
        raise ValueError(f"attention: segment_ids shape {segment_ids_BxT.shape}, expected {(b, t)}")


def attention(
    q_BxTxNxH: jax.Array,
    k_BxSxKxH: jax.Array,
    v_BxSxKxH: jax.Array,
    segment_ids_BxT: jax.Array,
    *,
    implementation: str = "xla",
    scale: float | None = None,
    softcap: float = 0.0,
    window=None,
    prefix=None,
) -> jax.Array:
    """Causal, segment-masked grouped-query attention; see the module docstring.

    scale: query scaling (default head_dim ** -0.5); softcap: logit soft-cap (0 = off);
    window: sliding window in tokens (None or 0 = full causal attention);
    prefix: None or (k_WxKxH, v_WxKxH) that every query sees first (xla and auto only).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; supported: {', '.join(IMPLEMENTATIONS)}"
        )
    _check_shapes(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    scale = q_BxTxNxH.shape[-1] ** -0.5 if scale is None else scale
    if prefix is not None:
        if implementation not in ("xla", "auto"):
            raise ValueError(f"attention implementation {implementation!r} cannot take a prefix; use xla")
        return _xla_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, softcap, window, prefix)
    return IMPLEMENTATIONS[implementation](q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, scale, softcap, window)
