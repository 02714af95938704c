"""attention(): numbers against a float64 numpy reference, masks, padding, bad names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.model.attention import attention, packed_causal_mask


def reference_attention(q, k, v, segment_ids):
    """Plain float64: repeat kv heads (HF repeat_kv order), mask, softmax, weighted sum."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, n, h = q.shape
    k = np.repeat(k, n // k.shape[2], axis=2)
    v = np.repeat(v, n // v.shape[2], axis=2)
    out = np.zeros_like(q)
    for bi in range(b):
        for i in range(t):
            allowed = [j for j in range(t) if j <= i and segment_ids[bi, j] == segment_ids[bi, i]]
            for head in range(n):
                scores = np.array([q[bi, i, head] @ k[bi, j, head] for j in allowed]) / np.sqrt(h)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[bi, i, head] = sum(pj * v[bi, j, head] for pj, j in zip(p, allowed))
    return out


def _inputs(seed=0, b=2, t=10, n=4, kv=2, h=8):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k = rng.normal(size=(b, t, kv, h)).astype(np.float32)
    v = rng.normal(size=(b, t, kv, h)).astype(np.float32)
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]], np.int32)[:b]
    return q, k, v, segment_ids


def test_matches_reference_with_gqa_and_segments():
    q, k, v, seg = _inputs()
    out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_multi_query_and_full_heads():
    for kv in (1, 4):
        q, k, v, seg = _inputs(seed=kv, kv=kv)
        out = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(seg))
        np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_other_segments_and_future_are_invisible():
    q, k, v, seg = _inputs()
    base = np.asarray(attention(q, k, v, seg))
    # Perturb keys/values of segment 3 (index 7) and the padding after it: rows of
    # segments 1 and 2 (indices 0..6) must not move.
    k2, v2 = k.copy(), v.copy()
    k2[0, 7:] += 5.0
    v2[0, 7:] -= 3.0
    moved = np.asarray(attention(q, k2, v2, seg))
    np.testing.assert_array_equal(moved[0, :7], base[0, :7])
    assert not np.allclose(moved[0, 7:], base[0, 7:])


def test_padding_stays_finite_even_for_an_all_pad_row():
    q, k, v, _ = _inputs()
    seg = np.zeros((2, 10), np.int32)
    out = np.asarray(attention(q, k, v, seg))
    assert np.isfinite(out).all()
    grad = jax.grad(lambda q: attention(q, k, v, seg).sum())(jnp.asarray(q))
    assert np.isfinite(np.asarray(grad)).all()


def test_mask_is_causal_and_segmented():
    mask = np.asarray(packed_causal_mask(jnp.array([[1, 1, 2, 0]])))[0]
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, expected)


def test_bfloat16_close_to_float32():
    q, k, v, seg = _inputs()
    ref = np.asarray(attention(q, k, v, seg))
    out = attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)), seg)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2)


def test_unknown_implementation_names_the_supported_ones():
    q, k, v, seg = _inputs()
    with pytest.raises(ValueError, match=r"'flash'.*supported: xla"):
        attention(q, k, v, seg, implementation="flash")


def test_bad_shapes_get_a_message():
    q, k, v, seg = _inputs()
    with pytest.raises(ValueError, match="not a multiple"):
        attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), seg)
    with pytest.raises(ValueError, match="segment_ids shape"):
        attention(q, k, v, seg[:, :5])
