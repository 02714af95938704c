"""`freeze`: only the params a selection names train; segments of the layer stack; exact gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.model import peft
from jaxsft.train import state as state_lib
from jaxsft.train.step import loss_sums

from test_lora_training import LoraSetup
from train_helpers import TINY_MODEL, VOCAB, make_batch

QWEN = dataclasses.replace(TINY_MODEL, family="qwen2", n_layers=4)
BITFIT_TOP = PeftConfig(method="freeze", trainable=("_bias$", "final_norm"), top_layers=1)


def _full_params(model: ModelConfig):
    return state_lib.init_params(model, VOCAB, seed=0)


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree, sep="/")


def test_selection_cuts_the_layer_stack_into_segments():
    params = _full_params(QWEN)
    cfg = PeftConfig(method="freeze", trainable=(r"blocks/[12]/mlp_norm",), top_layers=1)
    trainable, frozen = peft.init(cfg, params, jax.random.key(0))
    # layers 1-2 train their mlp_norm, layer 3 everything, layer 0 nothing: segments 0-1, 1-3, 3-4.
    assert sorted(_flat(trainable)) == ["blocks/1_3/mlp_norm/scale"] + sorted(
        f"blocks/3_4/{p}" for p in _flat(params["blocks"])
    )
    assert "blocks/0_1/mlp_norm/scale" in _flat(frozen) and "embedding" in _flat(frozen)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    # Joining the two trees gives the params back exactly.
    jax.tree.map(np.testing.assert_array_equal, peft.merged(cfg, trainable, frozen), params)
    with pytest.raises(ConfigError, match="model.peft.trainable: \\['nothing'\\] match no parameter"):
        peft.init(PeftConfig(method="freeze", trainable=("nothing",)), params, jax.random.key(0))


@pytest.mark.parametrize(
    "cfg",
    [
        pytest.param(BITFIT_TOP, marks=pytest.mark.slow),
        pytest.param(PeftConfig(method="freeze", trainable=("norm",)), marks=pytest.mark.slow),
        PeftConfig(method="freeze", top_layers=2),
    ],
    ids=["bitfit+top1", "norms", "top2"],
)
def test_loss_and_gradients_equal_the_full_model_restricted_to_the_selection(cfg):
    model = dataclasses.replace(QWEN, peft=cfg)
    setup = LoraSetup(model=QWEN, peft_cfg=cfg, devices=jax.devices()[:1], compile=False)
    params = _full_params(QWEN)
    trainable, frozen = peft.init(cfg, params, jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(np.random.default_rng(0), 4, 32).items()}
    full_fn = lambda p: loss_sums(setup.plan.graphdef, p, batch)[0]  # noqa: E731
    ours_fn = lambda t: loss_sums(setup.plan.graphdef, t, batch, frozen, cfg)[0]  # noqa: E731
    full_loss, full_grads = jax.jit(jax.value_and_grad(full_fn))(params)
    loss, grads = jax.jit(jax.value_and_grad(ours_fn))(trainable)
    np.testing.assert_allclose(float(loss), float(full_loss), rtol=1e-6)
    # The gradient of each trained slice is the full gradient's slice.
    expected, _ = peft.init(cfg, full_grads, jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, expected)
    assert model.peft == cfg


def test_backward_pass_stops_at_the_lowest_trained_layer():
    """Top-1 of 4 layers: the frozen 3-layer segment runs forward only (one scan, no transpose)."""
    cfg = PeftConfig(method="freeze", top_layers=1, trainable=("final_norm",))
    setup = LoraSetup(model=QWEN, peft_cfg=cfg, devices=jax.devices()[:1], compile=False)
    trainable, frozen = peft.init(cfg, _full_params(QWEN), jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in make_batch(np.random.default_rng(0), 2, 16).items()}
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: loss_sums(setup.plan.graphdef, t, batch, frozen, cfg)[0]))(trainable)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    # frozen segment forward (length 3), trained segment forward and backward (length 1).
    assert sorted(e.params["length"] for e in scans) == [1, 1, 3]


def test_bitfit_training_leaves_the_frozen_part_bit_identical(batches):
    setup = LoraSetup(model=QWEN, peft_cfg=BITFIT_TOP, devices=jax.devices()[:2])
    frozen_before = jax.tree.map(np.asarray, setup.base)
    trained_before = jax.tree.map(np.asarray, setup.state["params"])
    setup.run(batches)
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, setup.base))
    after = _flat(jax.tree.map(np.asarray, setup.state["params"]))
    moved = [p for p, x in _flat(trained_before).items() if not np.array_equal(x, after[p])]
    assert sorted(moved) == sorted(after)  # every trained param moved
    # Optimizer state only for the trained part (AdamW: two moments).
    n_trained = sum(x.size for x in jax.tree.leaves(setup.state["params"]))
    n_moments = sum(x.size for x in jax.tree.leaves(setup.state["opt_state"]) if x.ndim)
    assert n_moments == 2 * n_trained


def test_bitfit_count_on_a_qwen2_preset():
    """BitFit on Qwen2.5-7B: q/k/v biases of 28 layers (3584 + 2 x 512 each)."""
    model = ModelConfig(preset="qwen2.5-7b", peft=PeftConfig(method="freeze", trainable=("_bias$",)))
    trainable, total = peft.count(model, 152064)
    assert trainable == 28 * (3584 + 2 * 512)
    assert total == peft.count(dataclasses.replace(model, peft=PeftConfig()), 152064)[0]
