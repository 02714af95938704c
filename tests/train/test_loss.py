"""Masked cross-entropy against a float64 reference; untrained targets never matter."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.train.loss import cross_entropy_sum


def _reference(logits, targets, weights):
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return (nll * weights).sum(), weights.sum()


def test_matches_float64_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 4
    targets = rng.integers(0, 11, (3, 7))
    weights = (rng.random((3, 7)) < 0.5).astype(np.float32)
    loss_sum, weight = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    ref_sum, ref_weight = _reference(logits, targets, weights)
    np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-6)
    assert float(weight) == ref_weight


def test_untrained_targets_change_nothing():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 9, 13)).astype(np.float32))
    targets = rng.integers(0, 13, (2, 9))
    weights = (rng.random((2, 9)) < 0.5).astype(np.float32)
    changed = np.where(weights > 0, targets, rng.integers(0, 13, (2, 9)))
    assert (changed != targets).any()
    grad = jax.grad(lambda z, t: cross_entropy_sum(z, t, jnp.asarray(weights))[0])
    assert float(cross_entropy_sum(logits, targets, weights)[0]) == float(
        cross_entropy_sum(logits, changed, weights)[0]
    )
    np.testing.assert_array_equal(grad(logits, jnp.asarray(targets)), grad(logits, jnp.asarray(changed)))


def test_nonfinite_logits_at_untrained_positions_do_not_leak():
    logits = jnp.zeros((1, 2, 4)).at[0, 1].set(jnp.nan)
    loss_sum, _ = cross_entropy_sum(logits, jnp.zeros((1, 2), jnp.int32), jnp.asarray([[1.0, 0.0]]))
    np.testing.assert_allclose(float(loss_sum), np.log(4), rtol=1e-6)
