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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.model import blas, kernels

# Finite, so a masked logit never turns into inf - inf = NaN; exp() of it is exactly 0.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


def packed_causal_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """True where query t may attend key s: s <= t and both in the same segment."""
    length = segment_ids_BxT.shape[1]
    causal_TxS = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_segment_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return causal_TxS[None] & same_segment_BxTxS


def _grouped(q_BxTxNxH, kv_heads: int):
    """[B, T, N, H] -> [B, K, X, H]: query heads under their kv head, heads before tokens, and the
    T tokens' G query heads of a kv head one axis X = T*G, token-major (a block of tokens is a
    block of rows)."""
    b, t, n, h = q_BxTxNxH.shape
    return q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, -1, h)


def _ungrouped(out_BxKxXxH, length: int):
    b, k, x, h = out_BxKxXxH.shape
    return out_BxKxXxH.reshape(b, k, length, x // length, h).transpose(0, 2, 1, 3, 4).reshape(b, length, -1, h)


def _window(x, rows):
    return x if rows is None else x[:, :, rows[0] : rows[1]]


def _attend_forward(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap, rows=None, keys=None):
    """(out, residuals) of the queries in rows `rows` of X (all when None) against the keys and
    values in rows `keys` of S (all when None); `mask_BxTxS` is those queries' and keys' mask.
    Every product is one batched matmul over (B, K) with its operands in the layout it reads."""
    q_BxKxXxH, k_BxKxSxH, v_BxKxSxH = _window(q_BxKxXxH, rows), _window(k_BxKxSxH, keys), _window(v_BxKxSxH, keys)
    on_blas = blas.in_use(q_BxKxXxH, k_BxKxSxH)  # float32 on the CPU: batched BLAS calls, transposes as flags
    b, t, s = mask_BxTxS.shape
    if on_blas:
        logits_BxKxXxS = blas.matmul(q_BxKxXxH, k_BxKxSxH, trans_b=True)
    else:
        logits_BxKxXxS = jnp.einsum("bkxh,bksh->bkxs", q_BxKxXxH, k_BxKxSxH, preferred_element_type=jnp.float32)
    g = logits_BxKxXxS.shape[2] // t
    logits_BxKxXxS = logits_BxKxXxS.astype(jnp.float32) * scale
    chain_BxKxXxS = None
    if softcap:
        tanh_BxKxXxS = jnp.tanh(logits_BxKxXxS / softcap)
        logits_BxKxXxS = softcap * tanh_BxKxXxS
        chain_BxKxXxS = 1.0 - jnp.square(tanh_BxKxXxS)  # d cap*tanh(x/cap) / dx
    mask_Bx1xXxS = jnp.broadcast_to(mask_BxTxS[:, :, None], (b, t, g, s)).reshape(b, 1, t * g, s)
    logits_BxKxXxS = jnp.where(mask_Bx1xXxS, logits_BxKxXxS, _MASKED_LOGIT)
    probs_BxKxXxS = jax.nn.softmax(logits_BxKxXxS, axis=-1)
    if on_blas:
        out_BxKxXxH = blas.matmul(probs_BxKxXxS, v_BxKxSxH)
    else:
        out_BxKxXxH = jnp.einsum("bkxs,bksh->bkxh", probs_BxKxXxS.astype(v_BxKxSxH.dtype), v_BxKxSxH)
    return out_BxKxXxH, (probs_BxKxXxS, out_BxKxXxH, chain_BxKxXxS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale: float, softcap: float):
    """softmax(mask(softcap(q k^T * scale))) v, logits and softmax in float32; the gradient is
    written out (below) rather than left to autodiff."""
    return _attend_forward(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap)[0]


def _attend_fwd(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap):
    out_BxKxXxH, residuals = _attend_forward(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap)
    return out_BxKxXxH, (q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, *residuals)


def _attend_bwd(scale, softcap, residuals, d_out_BxKxXxH):
    q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, *rest = residuals
    return (*_attend_grads(scale, softcap, q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, *rest, d_out_BxKxXxH), None)


def _attend_grads(scale, softcap, q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, probs_BxKxXxS, out_BxKxXxH, chain_BxKxXxS,
                  d_out_BxKxXxH, rows=None, keys=None):  # fmt: skip
    """The gradients of the windows (`_attend_forward`'s rows of q and d_out, keys of k and v).

    The softmax gradient from the output (delta = rowsum(dO * O), as flash attention does),
    and the key and value gradients as (q^T dS)^T and (dO^T P)^T: each matmul reads the
    [X, S] tensors in their own layout; only the narrow [X, H] operands are transposed.
    Autodiff left XLA's CPU backend to transpose the [X, S] tensors (bench/NOTES.md)."""
    q_BxKxXxH, d_out_BxKxXxH = _window(q_BxKxXxH, rows), _window(d_out_BxKxXxH, rows)
    k_BxKxSxH, v_BxKxSxH = _window(k_BxKxSxH, keys), _window(v_BxKxSxH, keys)
    on_blas = blas.in_use(d_out_BxKxXxH, v_BxKxSxH)
    if on_blas:
        d_probs_BxKxXxS = blas.matmul(d_out_BxKxXxH, v_BxKxSxH, trans_b=True)
    else:
        d_probs_BxKxXxS = jnp.einsum("bkxh,bksh->bkxs", d_out_BxKxXxH, v_BxKxSxH, preferred_element_type=jnp.float32)
    delta_BxKxXx1 = jnp.sum(d_out_BxKxXxH.astype(jnp.float32) * out_BxKxXxH.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits_BxKxXxS = probs_BxKxXxS * (d_probs_BxKxXxS.astype(jnp.float32) - delta_BxKxXx1)
    if chain_BxKxXxS is not None:
        d_logits_BxKxXxS = d_logits_BxKxXxS * chain_BxKxXxS
    d_logits_BxKxXxS = (d_logits_BxKxXxS * scale).astype(q_BxKxXxH.dtype)
    if on_blas:  # every operand in its own layout: the transposes are BLAS flags
        return (
            blas.matmul(d_logits_BxKxXxS, k_BxKxSxH),
            blas.matmul(d_logits_BxKxXxS, q_BxKxXxH, trans_a=True),
            blas.matmul(probs_BxKxXxS, d_out_BxKxXxH, trans_a=True),
        )
    d_q_BxKxXxH = jnp.einsum("bkxs,bksh->bkxh", d_logits_BxKxXxS, k_BxKxSxH)
    q_BxKxHxX = jax.lax.optimization_barrier(q_BxKxXxH.swapaxes(2, 3))
    d_k_BxKxHxS = jnp.einsum("bkhx,bkxs->bkhs", q_BxKxHxX, d_logits_BxKxXxS)
    d_out_BxKxHxX = jax.lax.optimization_barrier(d_out_BxKxXxH.swapaxes(2, 3))
    d_v_BxKxHxS = jnp.einsum("bkhx,bkxs->bkhs", d_out_BxKxHxX, probs_BxKxXxS.astype(v_BxKxSxH.dtype))
    # Transposed after the products, not inside them (a fused output transpose sends a dot to
    # XLA's slower generic emitter on CPU).
    d_k_BxKxHxS, d_v_BxKxHxS = jax.lax.optimization_barrier((d_k_BxKxHxS, d_v_BxKxHxS))
    return (
        d_q_BxKxXxH.astype(q_BxKxXxH.dtype),
        d_k_BxKxHxS.swapaxes(2, 3).astype(k_BxKxSxH.dtype),
        d_v_BxKxHxS.swapaxes(2, 3).astype(v_BxKxSxH.dtype),
    )


_attend.defvjp(_attend_fwd, _attend_bwd)


def masked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS, scale: float, softcap: float = 0.0):
    """Grouped attention under an explicit mask; logits and softmax in float32 whatever the dtype.

    `softcap` > 0 squashes the logits as cap * tanh(logits / cap) (Gemma 2) before masking.
    """
    kv_heads = k_BxSxKxH.shape[2]
    k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.swapaxes(1, 2), v_BxSxKxH.swapaxes(1, 2)
    out_BxKxXxH = _attend(_grouped(q_BxTxNxH, kv_heads), k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap)
    return _ungrouped(out_BxKxXxH, q_BxTxNxH.shape[1])


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
    work, forward and backward). Within a block the mask does the rest, exactly as dense.
    q, k and v are put heads-first once for all blocks."""
    length = segment_ids_BxT.shape[1]
    mask_BxTxS = packed_causal_mask(segment_ids_BxT)
    if window is not None:
        mask_BxTxS = mask_BxTxS & window_mask(length, window)[None]
    width = 0 if prefix is None else prefix[0].shape[0]
    k_BxSxKxH, v_BxSxKxH, mask_BxTxS = with_prefix(k_BxSxKxH, v_BxSxKxH, mask_BxTxS, prefix)
    q_BxKxXxH = _grouped(q_BxTxNxH, k_BxSxKxH.shape[2])
    k_BxKxSxH, v_BxKxSxH = k_BxSxKxH.swapaxes(1, 2), v_BxSxKxH.swapaxes(1, 2)
    if _fused_on_cpu(q_BxKxXxH, k_BxKxSxH):
        window_ = jnp.asarray(0 if window is None else window, jnp.int32)
        out_BxKxXxH = _cpu_attention(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT.astype(jnp.int32), window_,
                                     float(scale), float(softcap))  # fmt: skip
        return _ungrouped(out_BxKxXxH, length)
    blocks = tuple(query_blocks(length))
    if len(blocks) == 1:
        return _ungrouped(_attend(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap), length)
    out_BxKxXxH = _attend_blocks(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap, blocks, width)
    return _ungrouped(out_BxKxXxH, length)


def _block_windows(q_BxKxXxH, blocks, start: int, end: int, width: int):
    """One query block's rows of X (its tokens' G heads each) and its keys (the prefix's W and
    the row's up to its last token)."""
    g = q_BxKxXxH.shape[2] // blocks[-1][1]  # the blocks end at the row's length
    return (start * g, end * g), (0, width + end)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _attend_blocks(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap, blocks, width):
    """`_attend` of each query block against the keys up to its last row, outputs concatenated.

    One VJP for all blocks: each block's key and value gradients are added into one [B, K, S, H]
    buffer in place, where autodiff of the slices padded every block's gradient to full length
    and summed the padded copies (bench/NOTES.md, round 6)."""
    return _attend_blocks_fwd(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap, blocks, width)[0]


def _attend_blocks_fwd(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask_BxTxS, scale, softcap, blocks, width):
    """q, k and v are kept once, not as each block's slice of them (which held 4.5x the keys'
    and values' size at 8 blocks between forward and backward)."""
    outs, residuals = [], []
    for start, end in blocks:
        rows, keys = _block_windows(q_BxKxXxH, blocks, start, end, width)
        mask = mask_BxTxS[:, start:end, : keys[1]]
        out, rest = _attend_forward(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, mask, scale, softcap, rows, keys)
        outs.append(out)
        residuals.append(rest)
    return jnp.concatenate(outs, axis=2), (q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, tuple(residuals))


def _attend_blocks_bwd(scale, softcap, blocks, width, residuals, d_out_BxKxXxH):
    q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, block_residuals = residuals
    d_qs = []
    d_k_BxKxSxH, d_v_BxKxSxH = jnp.zeros_like(k_BxKxSxH), jnp.zeros_like(v_BxKxSxH)
    for (start, end), rest in zip(blocks, block_residuals):
        rows, keys = _block_windows(q_BxKxXxH, blocks, start, end, width)
        d_q, d_k, d_v = _attend_grads(scale, softcap, q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, *rest, d_out_BxKxXxH, rows, keys)
        d_qs.append(d_q)
        d_k_BxKxSxH = d_k_BxKxSxH.at[:, :, : keys[1]].add(d_k)
        d_v_BxKxSxH = d_v_BxKxSxH.at[:, :, : keys[1]].add(d_v)
    return jnp.concatenate(d_qs, axis=2), d_k_BxKxSxH, d_v_BxKxSxH, None


_attend_blocks.defvjp(_attend_blocks_fwd, _attend_blocks_bwd)


def _fused_on_cpu(q_BxKxXxH, k_BxKxSxH) -> bool:
    """Whether the xla attention runs fused on the CPU's BLAS (blas_sgemm.cc): float32 on the CPU
    where `blas.matmul` is the BLAS's (a trace-time choice; a pre-flight for a TPU or GPU traces
    for its target and keeps the blocks below)."""
    return q_BxKxXxH.size > 0 and kernels.target_platform() == "cpu" and blas.in_use(q_BxKxXxH, k_BxKxSxH)


def _cpu_attention_fwd(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, window, scale, softcap):
    b, kv_heads, x, _ = q_BxKxXxH.shape
    outs = (jax.ShapeDtypeStruct(q_BxKxXxH.shape, jnp.float32), jax.ShapeDtypeStruct((b, kv_heads, x), jnp.float32))
    call = jax.ffi.ffi_call(blas.ATTENTION_FWD, outs, vmap_method="sequential")
    out_BxKxXxH, lse_BxKxX = call(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, window,
                                  scale=np.float32(scale), softcap=np.float32(softcap))  # fmt: skip
    return out_BxKxXxH, (q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, window, out_BxKxXxH, lse_BxKxX)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _cpu_attention(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, window, scale, softcap):
    """The xla attention in one call per direction on the CPU: each (row, kv head) on one thread,
    its query blocks (64 rows) one after another against the keys up to their last token, the
    mask built from the segment ids, the window and the prefix's width (S - T) inside, each
    block's logits in a buffer that stays in cache. The backward recomputes the probabilities
    from the forward's log-sum-exp, as flash attention does, so no [X, S] tensor is kept."""
    return _cpu_attention_fwd(q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT, window, scale, softcap)[0]


def _cpu_attention_bwd(scale, softcap, residuals, d_out_BxKxXxH):
    q_BxKxXxH, k_BxKxSxH, v_BxKxSxH, *_ = residuals
    outs = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BxKxXxH, k_BxKxSxH, v_BxKxSxH))
    call = jax.ffi.ffi_call(blas.ATTENTION_BWD, outs, vmap_method="sequential")
    d_q, d_k, d_v = call(*residuals, d_out_BxKxXxH, scale=np.float32(scale), softcap=np.float32(softcap))
    return d_q, d_k, d_v, None, None


_cpu_attention.defvjp(_cpu_attention_fwd, _cpu_attention_bwd)


IMPLEMENTATIONS = {
    "xla": _xla_attention,
    "cudnn": kernels.cudnn_attention,
    "splash": kernels.splash_attention,
    "pallas_gpu": kernels.pallas_gpu_attention,
}
_PLATFORM_KERNELS = {"tpu": "splash", "gpu": "cudnn"}


def _auto_attention(*args):
    """The platform's kernel where it can compute this call, else xla (trace-time choice)."""
    kernel = IMPLEMENTATIONS[_PLATFORM_KERNELS.get(kernels.target_platform(), "xla")]
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
