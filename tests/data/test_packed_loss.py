"""Invariant 4 on real pipeline batches: the loss (sum and weight) and its gradients over
the eval set are the same packed (first_fit, best_fit) as one example per row."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsft.config import Config, DataConfig, MeshConfig, ModelConfig, TrainConfig
from jaxsft.data.pipeline import build_data
from jaxsft.train import program as program_lib
from jaxsft.train import sharding
from jaxsft.train import state as state_lib
from jaxsft.train.step import loss_sums

MODEL = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = DataConfig(synthetic_train_examples=200, synthetic_eval_examples=40, max_length=96)
    data = build_data(cfg, seed=0, cache_dir=tmp_path_factory.mktemp("cache"))
    run = Config(model=MODEL, mesh=MeshConfig(data=1), train=TrainConfig(steps=10, seed=0))
    program = program_lib.build(run, data.tokenizer.vocab_size, sharding.make_mesh(run.mesh, jax.devices()[:1]))
    plan = program.plan
    params = state_lib.initial_state(run, data.tokenizer.vocab_size, program.optimizer, plan)[0]["params"]
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_sums(plan.graphdef, p, b), has_aux=True))
    return data, params, grad_fn


def _totals(batches, params, grad_fn):
    loss = weight = 0.0
    grads = None
    for b in batches:
        (part, w), g = grad_fn(params, b)
        loss, weight = loss + float(part), weight + float(w)
        grads = g if grads is None else jax.tree.map(lambda a, c: a + c, grads, g)
    return loss, weight, grads


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_eval_set_has_the_loss_and_gradients_of_the_unpacked(setup, packing):
    data, params, grad_fn = setup
    packed = dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, packing=packing)).eval_batches(8, 100)
    single = dataclasses.replace(data, cfg=dataclasses.replace(data.cfg, packing="none")).eval_batches(8, 100)
    assert len(packed) < len(single)  # several examples per row
    loss, weight, grads = _totals(packed, params, grad_fn)
    loss1, weight1, grads1 = _totals(single, params, grad_fn)
    assert weight == weight1 == data.eval_report.trained_tokens
    np.testing.assert_allclose(loss, loss1, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6), grads, grads1
    )
