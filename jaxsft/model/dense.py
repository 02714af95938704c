"""x @ w for the model's kernels, with a weight gradient XLA's CPU matmul runs at full speed.

Job: `dense(x, w, n_in)` contracts the last `n_in` axes of x with the first `n_in` of w
(the block's projections, "btd,dnh->btnh", "btnh,nhd->btd", "btd,df->btf", and the head),
and differentiates to the same numbers as autodiff of that einsum.

Why a custom VJP: a weight's gradient contracts over the tokens, x^T @ dy with x [M, I].
Left to itself, XLA's CPU backend folds the transpose into the dot and then picks a
layout that copies the larger operand (dy, [M, O]) instead, inside a loop fusion: the
head's weight gradient ran at 83 GFLOP/s against 169 with x^T materialised first
(bench/NOTES.md). `lax.optimization_barrier(x^T)` materialises it: an [I, M] copy of the
narrow side, which is what a BLAS caller would pass. On TPU and GPU the barrier costs one
transpose of an activation the matmul units would have read strided anyway.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxsft.model import blas


def _flat(x, w, n_in: int):
    """x [..., I...] -> [M, I], w [I..., O...] -> [I, O]."""
    features_in = math.prod(w.shape[:n_in])
    return x.reshape(-1, features_in), w.reshape(features_in, -1)


# The name of every dense() output. Remat policies that save matmul outputs cannot see the
# dot inside a custom VJP, so transformer.py's policies save (or offload) this name as well.
NAME = "dense"


def dense(x, w, n_in: int = 1, out_dtype=None):
    """einsum of x's last `n_in` axes with w's first `n_in` axes; result [x's leading, w's trailing].

    `out_dtype` (e.g. float32 logits from bfloat16 operands) is the matmul's accumulation and
    output type; None: the operands' type."""
    return checkpoint_name(_dense(x, w, n_in, out_dtype), NAME)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense(x, w, n_in: int, out_dtype):
    x_MxI, w_IxO = _flat(x, w, n_in)
    y_MxO = blas.matmul(x_MxI, w_IxO, preferred_element_type=out_dtype)
    return y_MxO.reshape(*x.shape[: x.ndim - n_in], *w.shape[n_in:])


def _dense_fwd(x, w, n_in, out_dtype):
    return _dense(x, w, n_in, out_dtype), (x, w)


def _dense_bwd(n_in, out_dtype, residuals, dy):
    x, w = residuals
    x_MxI, w_IxO = _flat(x, w, n_in)
    dy_MxO = dy.reshape(x_MxI.shape[0], w_IxO.shape[1]).astype(x.dtype)
    if blas.in_use(x_MxI, dy_MxO):  # the transposes are BLAS flags, never copies
        dx_MxI = blas.matmul(dy_MxO, w_IxO, trans_b=True)
        dw_IxO = blas.matmul(x_MxI, dy_MxO, trans_a=True)
        return dx_MxI.reshape(x.shape).astype(x.dtype), dw_IxO.reshape(w.shape).astype(w.dtype)
    dx_MxI = jnp.dot(dy_MxO, w_IxO.T)
    if x_MxI.shape[1] <= dy_MxO.shape[1]:  # transpose the narrower of x and dy
        dw_IxO = jnp.dot(jax.lax.optimization_barrier(x_MxI.T), dy_MxO)
    else:
        # The [O, I] product stays a plain matmul (a transpose fused into a dot's output sends
        # it to XLA's slower generic dot emitter, ~1.5x the time); the weight-sized transpose
        # after it is cheap.
        dw_IxO = jax.lax.optimization_barrier(jnp.dot(jax.lax.optimization_barrier(dy_MxO.T), x_MxI)).T
    return dx_MxI.reshape(x.shape).astype(x.dtype), dw_IxO.reshape(w.shape).astype(w.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)
