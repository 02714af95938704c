"""Masked cross-entropy that returns a (weighted sum, total weight) pair, never a mean.

Normalising is the caller's job and happens once per optimizer step over every
micro-batch and device (DESIGN invariant 5): a mean per micro-batch would weight a
token by how full its micro-batch happened to be.

`chunked_cross_entropy_sum` takes the final hidden states and the output head instead of
logits and computes the same pair a chunk of tokens at a time, so the `[B, T, V]` float32
logits (often the largest tensor of a fine-tuning step) never exist, forward or backward;
differentiated, it computes the gradient in the same pass (the train step's loss).

Shape suffixes follow the key in jaxsft/model/__init__.py (here M: the B*T tokens
flattened, C: chunks, E: tokens in one chunk).
"""

import functools

import jax
import jax.numpy as jnp

from jaxsft.model import blas


def _token_nll(logits_MxV, targets_M, weights_M):
    """(-log p(target) per token, zero where untrained; log-sum-exp per token), float32."""
    log_z_M = jax.nn.logsumexp(logits_MxV, axis=-1)
    # One logit per row: a gather forward, a scatter under autodiff (the chunked loss's own
    # gradient, _nll_grad, is a one-hot compare instead).
    target_logit_M = jnp.take_along_axis(logits_MxV, targets_M[:, None], axis=-1)[:, 0]
    # where() rather than a product so a non-finite logit at an untrained position cannot leak.
    return jnp.where(weights_M > 0, log_z_M - target_logit_M, 0.0), log_z_M


def _nll_grad(logits_MxV, log_z_M, targets_M, scale_M, chain_MxV=None):
    """d(sum of scale * nll)/d logits = scale * (softmax - one_hot(target)) [* chain], zero where
    scale is (even where a logit is not finite).

    One elementwise pass: the one-hot is an iota compare, never a scatter."""
    vocab_1xV = jax.lax.broadcasted_iota(jnp.int32, (1, logits_MxV.shape[-1]), 1)
    one_hot_MxV = vocab_1xV == targets_M[:, None]
    grad_MxV = (jnp.exp(logits_MxV - log_z_M[:, None]) - one_hot_MxV) * scale_M[:, None]
    if chain_MxV is not None:
        grad_MxV = grad_MxV * chain_MxV
    return jnp.where(scale_M[:, None] != 0, grad_MxV, 0.0)


def cross_entropy_sum(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array):
    """Returns (sum of weight * -log p(target), sum of weights), both float32 scalars."""
    vocab = logits_BxTxV.shape[-1]
    weights_M = weights_BxT.reshape(-1).astype(jnp.float32)
    nll_M, _ = _token_nll(logits_BxTxV.astype(jnp.float32).reshape(-1, vocab), targets_BxT.reshape(-1), weights_M)
    return jnp.sum(nll_M * weights_M), jnp.sum(weights_M)


def _softcap(logits, cap: float):
    return cap * jnp.tanh(logits / cap) if cap else logits


def _to_chunks(x_Mx, chunks: int):
    """[M, ...] -> [C, E, ...], chunk c holding tokens c, c + C, c + 2C, ... (see below)."""
    return x_Mx.reshape(-1, chunks, *x_Mx.shape[1:]).swapaxes(0, 1)


# On one device the trained tokens left after the whole chunks run in blocks of this many
# pieces of a chunk, rounded up to a piece: the work spent on untrained tokens is then under
# chunk / 4 instead of under a chunk (256 tokens at the default loss_chunk 1024).
_BOUNDARY_PIECES = 4


def _one_device() -> bool:
    """True when the program being traced runs on one device (no ambient mesh, or a mesh of 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _chunked_pass(hidden_MxD, head_DxV, targets_M, weights_M, chunk: int, softcap: float, dtype, grads: bool):
    """Loss sum, per-token nll and (with `grads`) d/d hidden and d/d head, one chunk of logits at a time.

    The gradient comes out of the forward pass: the loss is a scalar, so its cotangent only
    scales these, and the backward pass needs neither the logits nor a second matmul over them.
    On one device only the trained tokens run (`_trained_blocks`); under a mesh the tokens are
    split over devices, so the chunks stay strided (`chunked_cross_entropy_sum` says why)."""
    tokens, out_dtype, head_dtype = hidden_MxD.shape[0], hidden_MxD.dtype, head_DxV.dtype
    chunk = min(chunk, tokens)  # a batch smaller than one chunk is one chunk, unpadded
    head_DxV = head_DxV.astype(dtype)

    def body(carry, xs):
        total, d_head_DxV = carry
        hidden_ExD, targets_E, weights_E = xs
        hidden_ExD = hidden_ExD.astype(dtype)
        raw_ExV = blas.matmul(hidden_ExD, head_DxV, preferred_element_type=jnp.float32).astype(jnp.float32)
        logits_ExV = _softcap(raw_ExV, softcap)
        nll_E, log_z_E = _token_nll(logits_ExV, targets_E, weights_E)
        total = total + jnp.sum(nll_E * weights_E)
        if not grads:
            return (total, d_head_DxV), nll_E
        chain_ExV = 1.0 - jnp.square(logits_ExV / softcap) if softcap else None  # d cap*tanh(x/cap) / dx
        d_logits_ExV = _nll_grad(
            logits_ExV, log_z_E, targets_E, jnp.where(weights_E > 0, weights_E, 0.0), chain_ExV
        ).astype(dtype)
        if blas.in_use(hidden_ExD, d_logits_ExV):  # float32 on the CPU: transposes as BLAS flags
            d_hidden_ExD = blas.matmul(d_logits_ExV, head_DxV, trans_b=True)
            d_head_DxV = d_head_DxV + blas.matmul(hidden_ExD, d_logits_ExV, trans_a=True)
            return (total, d_head_DxV), (nll_E, d_hidden_ExD.astype(out_dtype))
        d_hidden_ExD = jnp.dot(d_logits_ExV, head_DxV.T, preferred_element_type=jnp.float32)
        # hidden^T materialised first: XLA's CPU dot otherwise copies the wide d_logits instead
        # (model/dense.py says why); 2x on this matmul.
        hidden_DxE = jax.lax.optimization_barrier(hidden_ExD.T)
        d_head_DxV = d_head_DxV + jnp.dot(hidden_DxE, d_logits_ExV, preferred_element_type=jnp.float32)
        return (total, d_head_DxV), (nll_E, d_hidden_ExD.astype(out_dtype))

    d_head = jnp.zeros(head_DxV.shape, jnp.float32) if grads else jnp.zeros((), jnp.float32)
    carry = (jnp.zeros((), jnp.float32), d_head)
    if _one_device():
        return _trained_blocks(body, carry, hidden_MxD, targets_M, weights_M, chunk, grads, head_dtype)
    pad = -tokens % chunk
    if pad:  # zero weight: padding adds nothing to the sums and gets no gradient
        hidden_MxD = jnp.pad(hidden_MxD, ((0, pad), (0, 0)))
        targets_M, weights_M = jnp.pad(targets_M, (0, pad)), jnp.pad(weights_M, (0, pad))
    chunks = hidden_MxD.shape[0] // chunk
    xs = (_to_chunks(hidden_MxD, chunks), _to_chunks(targets_M, chunks), _to_chunks(weights_M, chunks))
    (total, d_head_DxV), ys = jax.lax.scan(body, carry, xs)
    from_chunks = lambda y_CxEx: y_CxEx.swapaxes(0, 1).reshape(-1, *y_CxEx.shape[2:])[:tokens]  # noqa: E731
    if not grads:
        return total, from_chunks(ys)
    return total, from_chunks(ys[0]), from_chunks(ys[1]), d_head_DxV


def _trained_blocks(body, carry, hidden_MxD, targets_M, weights_M, chunk: int, grads: bool, head_dtype):
    """`body` over the trained tokens (weight > 0) only, in blocks; the untrained ones (prompts,
    padding: in SFT often a third to a half) get zero nll and gradient without a matmul.

    The trained tokens' positions, in order, are cut into whole chunks, then the rest, rounded
    up to a piece (1 / `_BOUNDARY_PIECES` of a chunk), into one block of k pieces: the work
    spent on untrained tokens is under one piece. Each size is a loop with a trip count known
    only at run time (0 or 1 for the k-piece blocks, one of which runs), so every matmul has a
    static shape and nothing runs for the rest. A block gathers its rows of the inputs and
    scatters its outputs into place, in the loop's own buffers: no sorted copy of the hidden
    states, no padded or permuted copy of their gradient (a `switch` over block sizes in a
    `scan` held both, and XLA copied the head's gradient into and out of the conditional).
    When the tokens are one chunk, a `switch` over the number of pieces runs one block and the
    head's gradient is that block's matmul, in the head's dtype: no float32 accumulator."""
    tokens = hidden_MxD.shape[0]
    pieces = _BOUNDARY_PIECES if chunk % _BOUNDARY_PIECES == 0 else 1
    piece = chunk // pieces
    order_M = jnp.argsort(weights_M <= 0, stable=True)  # trained first, each in its place's order
    # Blocks may read past the last token (a chunk that does not divide it): those rows point
    # at `tokens`, out of range: gathered as zeros (weight 0), their outputs dropped.
    order_M = jnp.pad(order_M, (0, -tokens % chunk), constant_values=tokens)
    trained_pieces = (jnp.sum(weights_M > 0) + piece - 1) // piece
    outputs = (jnp.zeros(tokens, jnp.float32),) + ((jnp.zeros_like(hidden_MxD),) if grads else ())

    def block(size):
        def run(start, state):
            carry, outputs = state
            rows_E = jax.lax.dynamic_slice_in_dim(order_M, start, size)
            take = lambda x: x.at[rows_E].get(mode="fill", fill_value=0, unique_indices=True)  # noqa: E731
            carry, ys = body(carry, (take(hidden_MxD), take(targets_M), take(weights_M)))
            ys = ys if grads else (ys,)
            put = lambda out, y: out.at[rows_E].set(y, mode="drop", unique_indices=True)  # noqa: E731
            return carry, tuple(map(put, outputs, ys))

        return run

    if tokens <= chunk:  # one block of the first k pieces; the carry's zeros fold away

        def first(k):
            def run():
                (total, d_head_DxV), outputs_k = block(k * piece)(0, (carry, outputs)) if k else (carry, outputs)
                return (total, *outputs_k, d_head_DxV.astype(head_dtype)) if grads else (total, outputs_k[0])

            return run

        return jax.lax.switch(trained_pieces, [first(k) for k in range(pieces + 1)])
    state = (carry, outputs)
    whole = trained_pieces // pieces
    state = jax.lax.fori_loop(0, whole, lambda i, state: block(chunk)(i * chunk, state), state)
    rest = trained_pieces % pieces
    for k in range(1, pieces):  # the pieces left, if any, as one block: one loop runs, once
        runs = (rest == k).astype(jnp.int32)
        # The start is `whole * chunk + i` with i = 0 whenever the loop runs: written with i, the
        # body depends on the loop's index, so XLA's loop-invariant code motion cannot hoist it out
        # of the loop, where it ran on every step, all three block sizes (bench/NOTES.md change 38).
        state = jax.lax.fori_loop(0, runs, lambda i, state, k=k: block(k * piece)(whole * chunk + i, state), state)
    (total, d_head_DxV), outputs = state
    return (total, *outputs, d_head_DxV) if grads else (total, outputs[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked_nll_sum(hidden_MxD, head_DxV, targets_M, weights_M, chunk, softcap, dtype):
    return _chunked_pass(hidden_MxD, head_DxV, targets_M, weights_M, chunk, softcap, dtype, grads=False)[0]


def _chunked_nll_sum_fwd(hidden_MxD, head_DxV, targets_M, weights_M, chunk, softcap, dtype):
    total, nll_M, d_hidden_MxD, d_head_DxV = _chunked_pass(
        hidden_MxD, head_DxV, targets_M, weights_M, chunk, softcap, dtype, grads=True
    )
    return total, (nll_M, d_hidden_MxD, d_head_DxV.astype(head_DxV.dtype))


def _chunked_nll_sum_bwd(chunk, softcap, dtype, residuals, g):
    nll_M, d_hidden_MxD, d_head_DxV = residuals
    return (g * d_hidden_MxD).astype(d_hidden_MxD.dtype), (g * d_head_DxV).astype(d_head_DxV.dtype), None, g * nll_M


_chunked_nll_sum.defvjp(_chunked_nll_sum_fwd, _chunked_nll_sum_bwd)


def chunked_cross_entropy_sum(
    hidden_BxTxD: jax.Array,
    head_DxV: jax.Array,
    targets_BxT: jax.Array,
    weights_BxT: jax.Array,
    chunk: int,
    softcap: float = 0.0,
    dtype=jnp.float32,
):
    """`cross_entropy_sum(softcap(hidden @ head), targets, weights)` without the full logits.

    The B*T tokens are split into chunks of `chunk` tokens; a `scan` computes one chunk's
    float32 logits at a time (peak: one [chunk, V] block and its gradient, plus XLA's
    workspace). Differentiated, the same pass also computes the gradients of hidden and
    head (a custom VJP): three matmuls over the logits in all, where autodiff with
    rematerialised chunks takes four. `dtype` is the matmuls' input dtype (the model's
    compute dtype); they accumulate in float32.

    Under a mesh, chunk c holds tokens c, c + C, c + 2C, ... of M (C chunks), not a contiguous
    run: the token axis is sharded over devices in contiguous blocks, so strided chunks give
    every device its own share of each chunk and the scan needs no communication. On one
    device only the trained tokens run (`_trained_blocks`).
    """
    depth = hidden_BxTxD.shape[-1]
    weights_M = weights_BxT.reshape(-1).astype(jnp.float32)
    total = _chunked_nll_sum(
        hidden_BxTxD.reshape(-1, depth), head_DxV, targets_BxT.reshape(-1), weights_M, chunk, softcap, jnp.dtype(dtype)
    )
    return total, jnp.sum(weights_M)
