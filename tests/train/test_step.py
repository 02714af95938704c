"""The train step: global loss normalisation, packing invariance, sharding invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.config import STRATEGIES, MeshConfig
from jaxsft.train import sharding
from jaxsft.train.step import loss_sums

from train_helpers import VOCAB, Setup, make_batch

ONE_DEVICE = dict(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def one_device_run():
    rng = np.random.default_rng(0)
    reference = Setup(**ONE_DEVICE)
    losses = reference.run([make_batch(rng, rows=8, length=32) for _ in range(3)])
    return losses, reference.state["params"]


def _close(a, b, tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


def test_micro_batches_equal_one_batch(batches):
    whole, split = Setup(**ONE_DEVICE), Setup(micro_batches=4, **ONE_DEVICE)
    np.testing.assert_allclose(whole.run(batches), split.run(batches), rtol=1e-5)
    # 2e-5: the two sum their gradients in different orders, and Adam at lr 1e-2 turns a
    # last-bit difference of a near-zero gradient into ~1e-5 of a parameter (max seen 1.0e-5).
    _close(whole.state["params"], split.state["params"], 2e-5)


def test_loss_is_normalised_over_the_whole_step():
    """Micro-batches with very different trained-token counts: the step loss is total/total."""
    rng = np.random.default_rng(3)
    batch = make_batch(rng, rows=4, length=32)
    batch["loss_weights"][0::2] = 0.0  # micro-batch 0 of 2 (rows 0, 2) trains nothing
    batch["loss_weights"][1, :3] = 1.0
    setup = Setup(micro_batches=2, **ONE_DEVICE)
    params = setup.state["params"]
    loss_sum, weight = loss_sums(setup.plan.graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
    assert setup.run([batch])[0] == pytest.approx(float(loss_sum / weight), rel=1e-5)


def _example(rng, n):
    tokens = rng.integers(1, VOCAB, n + 1)
    return tokens[:-1], tokens[1:], (rng.random(n) < 0.7).astype(np.float32)


def test_packed_batch_equals_unpacked():
    rng = np.random.default_rng(7)
    examples = [_example(rng, n) for n in (9, 5, 12)]
    length = 32
    packed = {k: np.zeros((1, length), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    packed["loss_weights"] = np.zeros((1, length), np.float32)
    unpacked = {k: np.zeros((3, length), v.dtype) for k, v in packed.items()}
    start = 0
    for i, (inputs, targets, weights) in enumerate(examples):
        n, sl = len(inputs), slice(start, start + len(inputs))
        for batch, row, where in ((packed, 0, sl), (unpacked, i, slice(0, n))):
            batch["inputs"][row, where], batch["targets"][row, where] = inputs, targets
            batch["loss_weights"][row, where], batch["positions"][row, where] = weights, np.arange(n)
            batch["segment_ids"][row, where] = i + 1 if batch is packed else 1
        start += n
    setup = Setup(**ONE_DEVICE)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(setup.plan.graphdef, p, b), has_aux=True))
    (packed_loss, packed_weight), packed_grads = grad_fn(setup.state["params"], packed)
    (loss, weight), grads = grad_fn(setup.state["params"], unpacked)
    assert float(packed_weight) == float(weight) > 0
    np.testing.assert_allclose(float(packed_loss), float(loss), rtol=1e-5)
    _close(packed_grads, grads, 1e-5)


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        # The plain suite keeps the 2x2x2 case, which splits all three ways; `-m slow` runs the rest.
        pytest.param(MeshConfig(data=8, strategy="dp", rules=STRATEGIES["dp"]), marks=pytest.mark.slow),
        pytest.param(MeshConfig(data=1, fsdp=8, strategy="fsdp", rules=STRATEGIES["fsdp"]), marks=pytest.mark.slow),
        pytest.param(MeshConfig(data=4, tensor=2, strategy="tp", rules=STRATEGIES["tp"]), marks=pytest.mark.slow),
        MeshConfig(data=2, fsdp=2, tensor=2, strategy="fsdp_tp", rules=STRATEGIES["fsdp_tp"]),
    ],
    ids=["dp_data8", "fsdp8", "tp_data4_tensor2", "fsdp_tp_2x2x2"],
)
def test_sharded_runs_equal_one_device(batches, one_device_run, mesh_cfg):
    reference_losses, reference_params = one_device_run
    sharded = Setup(mesh_cfg)
    q_proj = sharded.state["params"]["blocks"]["attn"]["q_proj"]  # [layers, embed, heads, head_dim]
    expected = {"dp": 1, "fsdp": 8, "tp": 2, "fsdp_tp": 4}[mesh_cfg.strategy]
    assert q_proj.size == q_proj.addressable_shards[0].data.size * expected  # the strategy's split
    np.testing.assert_allclose(sharded.run(batches), reference_losses, rtol=2e-5)
    _close(sharded.state["params"], reference_params, 2e-5)


def _argument_bytes(setup: Setup, batch) -> int:
    """Per-device bytes of the step's inputs (params, optimizer state, batch) from XLA's analysis."""
    with jax.set_mesh(setup.mesh):
        compiled = setup.step.lower(setup.state, sharding.global_batch(batch, setup.batch_sharding)).compile()
    return compiled.memory_analysis().argument_size_in_bytes


def test_fsdp_splits_params_and_optimizer_state_eight_ways(batches):
    one, fsdp = Setup(**ONE_DEVICE), Setup(MeshConfig(data=1, fsdp=8))
    total, per_device = _argument_bytes(one, batches[0]), _argument_bytes(fsdp, batches[0])
    # Every weight of the tiny model has a dimension divisible by 8 on `embed`; what stays
    # replicated is the step counter and Adam's counts (a few bytes).
    assert per_device <= total / 8 + 64, (per_device, total)
    moments = [x for x in jax.tree.leaves(fsdp.state["opt_state"]) if x.ndim >= 1]
    assert moments and all(x.addressable_shards[0].data.size * 8 == x.size for x in moments)
