"""The xla attention's causal block skipping: the same numbers as one dense masked product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.model.attention import attention, masked_attention, packed_causal_mask, query_blocks, window_mask


def test_query_blocks_cover_the_row_once():
    assert query_blocks(32) == [(0, 32)]  # short rows: one block, nothing to skip
    for length in (200, 512, 4096):
        blocks = query_blocks(length)
        assert blocks[0][0] == 0 and blocks[-1][1] == length and len(blocks) <= 8
        assert all(end == start for (_, end), (start, _) in zip(blocks, blocks[1:]))


def _dense(q, k, v, segment_ids, window=None):
    mask = packed_causal_mask(segment_ids)
    if window is not None:
        mask = mask & window_mask(segment_ids.shape[1], window)[None]
    return masked_attention(q, k, v, mask, q.shape[-1] ** -0.5)


@pytest.mark.parametrize("window", [pytest.param(None, marks=pytest.mark.slow), 50])
def test_blocks_equal_dense_values_and_gradients(window):
    b, t, n, kv, h = 2, 200, 4, 2, 8  # 4 blocks of 64, the last one short
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)).astype(np.float32)) for heads in (n, kv, kv))
    # Segments that straddle block edges, and padding at the end of row 0.
    segment_ids = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [70, 60, 50, 20]), np.repeat([1, 2], [130, 70])]))
    blocked = lambda q, k, v: attention(q, k, v, segment_ids, window=window)  # noqa: E731
    dense = lambda q, k, v: _dense(q, k, v, segment_ids, window)  # noqa: E731
    np.testing.assert_allclose(np.asarray(blocked(q, k, v)), np.asarray(dense(q, k, v)), rtol=1e-5, atol=1e-6)
    cotangent = jnp.asarray(rng.normal(size=(b, t, n, h)).astype(np.float32))
    grads = jax.grad(lambda *a: jnp.sum(blocked(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(dense(*a) * cotangent), argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, ref):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
