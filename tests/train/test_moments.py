"""Adam moments in bfloat16: half the optimizer bytes, nearly the same training."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsft.config import ConfigError, OptimConfig
from jaxsft.config_load import from_dict
from jaxsft.train import sharding
from jaxsft.train.optim import decay_mask, make_optimizer, schedule

from train_helpers import Setup

ONE_DEVICE = dict(devices=jax.devices()[:1])
F32 = OptimConfig(learning_rate=1e-2, warmup_steps=0)
BF16 = dataclasses.replace(F32, moments_dtype="bfloat16")


def _moments(opt_state) -> list[jax.Array]:
    return [x for x in jax.tree.leaves(opt_state) if x.ndim >= 1]


def test_float32_moments_are_plain_adamw():
    """The spelled-out chain keeps optax.adamw's state tree and numbers (old checkpoints restore)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "norm": jnp.ones(4)}
    grads = jax.tree.map(lambda p: 0.1 * p + 0.05, params)
    reference = optax.chain(
        optax.clip_by_global_norm(F32.clip_norm),
        optax.adamw(
            schedule(F32, 10), b1=F32.b1, b2=F32.b2, eps=F32.eps, weight_decay=F32.weight_decay, mask=decay_mask
        ),
    )
    ours = make_optimizer(F32, 10)
    state_ref, state = reference.init(params), ours.init(params)
    assert jax.tree.structure(state_ref) == jax.tree.structure(state)
    for _ in range(2):
        updates_ref, state_ref = reference.update(grads, state_ref, params)
        updates, state = ours.update(grads, state, params)
        jax.tree.map(np.testing.assert_array_equal, updates, updates_ref)


def _argument_bytes(setup: Setup, batch) -> int:
    with jax.set_mesh(setup.mesh):
        compiled = setup.step.lower(setup.state, sharding.global_batch(batch, setup.batch_sharding)).compile()
    return compiled.memory_analysis().argument_size_in_bytes


@pytest.mark.slow
def test_bf16_moments_halve_optimizer_bytes_and_train_close(batches):
    f32, bf16 = Setup(optim=F32, **ONE_DEVICE), Setup(optim=BF16, **ONE_DEVICE)
    assert all(x.dtype == jnp.bfloat16 for x in _moments(bf16.state["opt_state"]))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(f32.state["params"]))
    saved = _argument_bytes(f32, batches[0]) - _argument_bytes(bf16, batches[0])
    assert saved == param_bytes  # two moments, each from 4 bytes to 2 per parameter
    f32_losses, bf16_losses = f32.run(batches), bf16.run(batches)
    # Still bf16 after updates (optax keeps nu in its stored dtype), params still float32.
    assert all(x.dtype == jnp.bfloat16 for x in _moments(bf16.state["opt_state"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.state["params"]))
    np.testing.assert_allclose(bf16_losses, f32_losses, rtol=2e-3)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4),
        bf16.state["params"],
        f32.state["params"],
    )


def test_bf16_moments_refuse_a_b2_they_cannot_follow():
    nu = jnp.ones((), jnp.bfloat16)
    assert (0.999 * nu.astype(jnp.float32)).astype(jnp.bfloat16) == nu  # why: the decay rounds away
    assert (0.95 * nu.astype(jnp.float32)).astype(jnp.bfloat16) < nu
    with pytest.raises(ConfigError, match="optim.moments_dtype=bfloat16 needs optim.b2 <= 0.99"):
        from_dict({"optim": {"moments_dtype": "bfloat16", "b2": 0.999}})
    assert from_dict({"optim": {"moments_dtype": "bfloat16"}}).optim.moments_dtype == "bfloat16"
    with pytest.raises(ConfigError, match="optim.moments_dtype"):
        from_dict({"optim": {"moments_dtype": "float16"}})


@pytest.mark.slow
def test_preflight_reports_half_the_optimizer_bytes():
    pytest.importorskip("libtpu", reason="pip install -e '.[tpu]'")
    from jaxsft import config_load
    from jaxsft.train import aot

    small = [
        "model.vocab_size=512",
        "model.d_model=256",
        "model.n_layers=2",
        "model.head_dim=64",
        "model.d_ff=512",
        "data.max_length=128",
        "train.global_batch_size=4",
        "mesh.data=1",
        "mesh.fsdp=-1",
    ]
    devices, chip, chips = aot.topology("v5e-4")
    reports = [
        aot.compile_for(config_load.load(None, small + [f"optim.moments_dtype={dtype}"]), devices, chip, chips)
        for dtype in ("float32", "bfloat16")
    ]
    counters = 8  # Adam's and the schedule's int32 step counts, replicated
    assert (reports[1].optimizer_bytes - counters) * 2 == reports[0].optimizer_bytes - counters


def test_moments_dtype_holds_for_bfloat16_params():
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    for cfg, dtype in ((F32, jnp.float32), (BF16, jnp.bfloat16)):
        optimizer = make_optimizer(cfg, 10)
        state = optimizer.init(params)
        _, state = optimizer.update(grads, state, params)
        assert {x.dtype for x in _moments(state)} == {jnp.dtype(dtype)}
