"""The hand-written gradients (dense, attention, rotary, RMSNorm, the gated activation) equal
autodiff of the plain formulas.

Each op has a custom VJP for speed on XLA's CPU backend (bench/NOTES.md); these tests hold
its values and gradients to autodiff of the textbook einsum in float64 (jax x64 inside a
context), and its float32 run to the float64 numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.model.attention import _MASKED_LOGIT, attention, masked_attention, packed_causal_mask, window_mask
from jaxsft.model.dense import dense
from jaxsft.model.layers import _ACTIVATIONS, apply_rope, gated, rms_norm, rope_tables


def _grads(fn, args, cotangent):
    """(value, gradients of sum(fn(*args) * cotangent) w.r.t. every arg)."""
    value, vjp = jax.vjp(fn, *args)
    return value, vjp(cotangent)


def _compare(fast, plain, args, rtol=1e-5, atol=1e-5):
    """fast(float32 args) against plain(float64 args): values and gradients for one random cotangent."""
    with jax.enable_x64(True):
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        shape = jax.eval_shape(plain, *args64).shape
        cotangent = np.random.default_rng(1).normal(size=shape)
        want, want_grads = _grads(plain, args64, jnp.asarray(cotangent))
        want, want_grads = np.asarray(want), [np.asarray(g) for g in want_grads]
    got, got_grads = _grads(fast, [jnp.asarray(a, jnp.float32) for a in args], jnp.asarray(cotangent, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=rtol, atol=atol)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "n_in", "spec"),
    [
        ((2, 5, 6), (6, 9), 1, "btd,df->btf"),  # x narrower: x^T is the transposed side
        ((2, 5, 9), (9, 6), 1, "btf,fd->btd"),  # dy narrower: dw^T is computed
        ((2, 5, 3, 4), (3, 4, 7), 2, "btnh,nhd->btd"),  # two contracted axes (o_proj)
        ((2, 5, 6), (6, 3, 4), 1, "btd,dnh->btnh"),  # two output axes (q/k/v)
    ],
)
def test_dense_equals_the_einsum(x_shape, w_shape, n_in, spec):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=x_shape), rng.normal(size=w_shape)
    _compare(lambda x, w: dense(x, w, n_in), lambda x, w: jnp.einsum(spec, x, w), [x, w])


def test_dense_keeps_bfloat16():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    w = jnp.ones((4, 5), jnp.bfloat16)
    y, (dx, dw) = _grads(lambda x, w: dense(x, w), [x, w], jnp.ones((2, 3, 5), jnp.bfloat16))
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    assert float(dw[0, 0]) == 6.0 and float(dx[0, 0, 0]) == 5.0
    # float32 out (the logits): accumulated and returned in float32, gradients in the operands' type
    y, (dx, dw) = _grads(lambda x, w: dense(x, w, 1, jnp.float32), [x, w], jnp.ones((2, 3, 5), jnp.float32))
    assert y.dtype == jnp.float32 and dx.dtype == dw.dtype == jnp.bfloat16


def _plain_attention(q, k, v, mask, scale, softcap=0.0):
    """The textbook form autodiff differentiates: repeat kv heads, mask, softmax, weighted sum."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, None], logits, _MASKED_LOGIT)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def _qkv_segments(b=2, t=200, n=4, kv=2, h=8):
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(b, t, heads, h)) for heads in (n, kv, kv))
    segment_ids = np.stack([np.repeat([1, 2, 3, 0], [70, 60, 50, 20]), np.repeat([1, 2], [130, 70])])
    return q, k, v, jnp.asarray(segment_ids, jnp.int32)


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_masked_attention_equals_autodiff_of_the_plain_form(softcap):
    q, k, v, segment_ids = _qkv_segments(t=40)
    mask = packed_causal_mask(segment_ids[:, :40])
    _compare(
        lambda q, k, v: masked_attention(q, k, v, mask, 0.3, softcap),
        lambda q, k, v: _plain_attention(q, k, v, mask, 0.3, softcap),
        [q, k, v],
    )


@pytest.mark.parametrize("window", [None, 50])
def test_blocked_attention_equals_autodiff_of_the_plain_form(window):
    """200 tokens: 4 query blocks of 64, segments straddling their edges, padding, GQA."""
    q, k, v, segment_ids = _qkv_segments()
    mask = packed_causal_mask(segment_ids)
    if window is not None:
        mask = mask & window_mask(segment_ids.shape[1], window)[None]
    _compare(
        lambda q, k, v: attention(q, k, v, segment_ids, window=window),
        lambda q, k, v: _plain_attention(q, k, v, mask, q.shape[-1] ** -0.5),
        [q, k, v],
    )


@pytest.mark.slow
def test_attention_with_a_prefix_equals_autodiff_of_the_plain_form():
    """Prefix keys/values (prefix tuning) get their gradient too, through every query block."""
    q, k, v, segment_ids = _qkv_segments()
    rng = np.random.default_rng(2)
    prefix_k, prefix_v = rng.normal(size=(3, 2, 8)), rng.normal(size=(3, 2, 8))

    def plain(q, k, v, pk, pv):
        b, t = segment_ids.shape
        keys = jnp.concatenate([jnp.broadcast_to(pk, (b, *pk.shape)), k], axis=1)
        values = jnp.concatenate([jnp.broadcast_to(pv, (b, *pv.shape)), v], axis=1)
        mask = jnp.concatenate([jnp.ones((b, t, 3), bool), packed_causal_mask(segment_ids)], axis=2)
        return _plain_attention(q, keys, values, mask, q.shape[-1] ** -0.5)

    _compare(
        lambda q, k, v, pk, pv: attention(q, k, v, segment_ids, prefix=(pk, pv)),
        plain,
        [q, k, v, prefix_k, prefix_v],
    )


def test_rope_equals_autodiff_of_rotate_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 7, 3, 8))
    positions = jnp.asarray(np.tile(np.arange(7), (2, 1)))

    def plain(x):
        cos, sin = (t.astype(x.dtype) for t in rope_tables(positions, 8, 10000.0))
        first, second = jnp.split(x, 2, axis=-1)
        return x * cos[:, :, None] + jnp.concatenate([-second, first], axis=-1) * sin[:, :, None]

    cos, sin = rope_tables(positions, 8, 10000.0)
    _compare(lambda x: apply_rope(x, cos, sin), plain, [x])


@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama, Gemma
@pytest.mark.parametrize("shape", [(2, 5, 8), (2, 5, 3, 4)])  # the block's norms; q/k norms over head_dim
def test_rms_norm_equals_autodiff_of_the_formula(offset, shape):
    rng = np.random.default_rng(0)
    x, scale = rng.normal(size=shape), rng.normal(size=shape[-1:])

    def plain(x, scale):
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * (offset + scale)

    _compare(lambda x, scale: rms_norm(x, scale, 1e-6, offset), plain, [x, scale])


def test_rms_norm_keeps_bfloat16_within_its_rounding_of_float64():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.bfloat16)
    scale = jnp.asarray(rng.normal(size=(64,)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(2, 3, 64)), jnp.bfloat16)
    y, grads = _grads(lambda x, s: rms_norm(x, s, 1e-6, 0.0), [x, scale], cotangent)
    assert y.dtype == grads[0].dtype == grads[1].dtype == jnp.bfloat16
    with jax.enable_x64(True):  # the formula on the same bfloat16 values, in float64
        args64 = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, cotangent)]
        want, want_grads = _grads(
            lambda x, s: x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * s, args64[:2], args64[2]
        )
    for got, ref in zip([y, *grads], [want, *want_grads], strict=True):
        ref = np.asarray(ref)
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())


@pytest.mark.parametrize("activation", sorted(_ACTIVATIONS))
def test_gated_activation_equals_autodiff_of_the_product(activation):
    rng = np.random.default_rng(0)
    gate, up = rng.normal(size=(2, 5, 7)) * 3, rng.normal(size=(2, 5, 7))
    _compare(lambda g, u: gated(g, u, activation), lambda g, u: _ACTIVATIONS[activation](g) * u, [gate, up], rtol=1e-5)
