"""The optimizer: which parameters decay, the learning-rate schedule, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.config import OptimConfig
from jaxsft.model.transformer import Transformer
from jaxsft.train.optim import decay_mask, make_optimizer, schedule

from train_helpers import TINY_MODEL, VOCAB


def test_weight_decay_skips_norms_and_embeddings_only():
    model = nnx.eval_shape(lambda: Transformer(TINY_MODEL, VOCAB, rngs=nnx.Rngs(0)))
    params = nnx.state(model).to_pure_dict()
    flat = {"/".join(map(str, k)): v for k, v in nnx.traversals.flatten_mapping(decay_mask(params)).items()}
    assert {k for k, decays in flat.items() if not decays} == {
        "embedding",
        "final_norm/scale",
        "blocks/attn_norm/scale",
        "blocks/mlp_norm/scale",
    }
    assert all(flat[k] for k in ("lm_head", "blocks/attn/q_proj", "blocks/mlp/down_proj"))


def test_weight_decay_skips_biases():
    import dataclasses

    qwen2 = dataclasses.replace(TINY_MODEL, family="qwen2")
    model = nnx.eval_shape(lambda: Transformer(qwen2, VOCAB, rngs=nnx.Rngs(0)))
    flat = {
        "/".join(map(str, k)): v
        for k, v in nnx.traversals.flatten_mapping(decay_mask(nnx.state(model).to_pure_dict())).items()
    }
    biases = {k for k in flat if "bias" in k}
    assert biases == {"blocks/attn/q_bias", "blocks/attn/k_bias", "blocks/attn/v_bias"}
    assert not any(flat[k] for k in biases) and flat["blocks/attn/q_proj"]


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, end_learning_rate_ratio=0.1)
    lr = schedule(cfg, total_steps=100)
    assert float(lr(0)) == 0.0 and float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(5)) == pytest.approx(5e-4) and float(lr(100)) == pytest.approx(1e-4)
    assert all(float(lr(s)) >= float(lr(s + 1)) for s in range(10, 100))


def test_gradients_are_clipped_by_global_norm_before_adam():
    cfg = OptimConfig(learning_rate=1.0, warmup_steps=0, clip_norm=1.0, b1=0.9)
    optimizer = make_optimizer(cfg, total_steps=10)
    params = {"w": jnp.zeros(4)}
    _, state = optimizer.update({"w": jnp.asarray([30.0, 40.0, 0.0, 0.0])}, optimizer.init(params), params)
    first_moment = jax.tree.leaves(
        [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")][0].mu
    )[0]
    # The gradient's norm is 50; clipped to norm 1 it is [0.6, 0.8, 0, 0]; Adam keeps 0.1 of it.
    np.testing.assert_allclose(np.asarray(first_moment), [0.06, 0.08, 0.0, 0.0], rtol=1e-6)
