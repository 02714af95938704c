"""The drift penalty (L2-SP, `optim.drift_penalty`): the objective and its gradient against a
float64 computation, added once per step, zero at the start, sharding-invariant, never
checkpointed and rebuilt exactly on resume."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxsft import config_load
from jaxsft.config import ConfigError, MeshConfig, OptimConfig
from jaxsft.model.transformer import Transformer
from jaxsft.train import sharding
from jaxsft.train.checkpoint import read_state
from jaxsft.train.step import make_train_step
from jaxsft.train.trainer import train

from test_trainer import TINY
from train_helpers import TINY_MODEL, VOCAB, Setup, make_batch

LAMBDA = 0.3
ONE_DEVICE = dict(devices=jax.devices()[:1])
DRIFT = OptimConfig(learning_rate=1e-2, warmup_steps=0, drift_penalty=LAMBDA)


def _gradient_recorder() -> optax.GradientTransformation:
    """An 'optimizer' that keeps the step's gradient as its state and changes nothing."""
    return optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g)
    )


def _float64_objective(graphdef64, batch, anchor64):
    """CE_sum / W + lambda * ||p - anchor||^2, written from the definition, in float64."""

    def objective(p):
        model = nnx.merge(graphdef64, p)
        logits = model.logits(model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"]))
        logp = jax.nn.log_softmax(logits.astype(jnp.float64), axis=-1)
        target_logp = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        w = batch["loss_weights"].astype(jnp.float64)
        drift = sum(jnp.sum((x - a) ** 2) for x, a in zip(jax.tree.leaves(p), jax.tree.leaves(anchor64)))
        return -jnp.sum(w * target_logp) / jnp.sum(w) + LAMBDA * drift, drift

    return jax.value_and_grad(objective, has_aux=True)


@pytest.fixture(scope="module")
def moved():
    """A tiny model's params, an anchor theta_0 away from them, a batch, and the float64 reference
    (objective, drift, gradient)."""
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(v) for k, v in make_batch(rng, rows=4, length=32).items()}
    graphdef, state = nnx.split(Transformer(TINY_MODEL, VOCAB, rngs=nnx.Rngs(0)))
    params = state.to_pure_dict()
    leaves = jax.tree.leaves(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    noise = [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    anchor = jax.tree.unflatten(jax.tree.structure(params), [x + n for x, n in zip(leaves, noise)])
    with jax.enable_x64(True):
        model64 = dataclasses.replace(TINY_MODEL, dtype="float64", param_dtype="float64")
        graphdef64, _ = nnx.split(Transformer(model64, VOCAB, rngs=nnx.Rngs(0)))
        to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float64)), t)  # noqa: E731
        a64 = to64(anchor)
        (objective, drift), grads64 = jax.jit(_float64_objective(graphdef64, batch, a64))(to64(params))
        reference = (float(objective), float(drift), jax.tree.map(np.asarray, grads64))
    return graphdef, params, anchor, batch, reference


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_penalty_and_gradient_equal_a_float64_computation(moved, micro_batches):
    """The step's gradient is d/dp [CE_sum/W + lambda ||p - p0||^2]: the penalty is added once
    per optimizer step (after the global division), so 2 micro-batches give the same."""
    graphdef, params, anchor, batch, (objective, drift, grads64) = moved
    step = make_train_step(
        graphdef=graphdef,
        optimizer=_gradient_recorder(),
        schedule=optax.constant_schedule(0.0),
        micro_batches=micro_batches,
        drift_penalty=LAMBDA,
    )
    opt = _gradient_recorder()
    new_state, metrics = jax.jit(step)(
        {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params)}, batch, None, anchor
    )
    hand = sum(
        float(np.sum((np.asarray(a, np.float64) - np.asarray(p, np.float64)) ** 2))
        for a, p in zip(jax.tree.leaves(anchor), jax.tree.leaves(params))
    )
    assert drift == pytest.approx(hand, rel=1e-12)
    assert float(metrics["drift"]) == pytest.approx(drift, rel=1e-5)
    assert float(metrics["loss"]) + LAMBDA * float(metrics["drift"]) == pytest.approx(objective, rel=1e-5)
    jax.tree.map(
        lambda ours, ref: np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-6),
        new_state["opt_state"],
        grads64,
    )


def _drift_run(setup: Setup, batches) -> tuple[list[float], list[float]]:
    losses, drifts = [], []
    for batch in batches:
        with setup.program.context():
            setup.state, metrics = setup.step(
                setup.state, sharding.global_batch(batch, setup.batch_sharding), *setup.anchor
            )
        losses.append(float(metrics["loss"]))
        drifts.append(float(metrics["drift"]))
    return losses, drifts


@pytest.mark.slow
def test_lambda_zero_has_no_anchor_and_the_first_penalised_step_equals_the_plain_step(batches):
    """lambda = 0 builds today's program (no anchor argument at all); with lambda > 0 the anchor
    is the start, so the first step's penalty and its gradient are exactly zero."""
    plain = Setup(optim=dataclasses.replace(DRIFT, drift_penalty=0.0), **ONE_DEVICE)
    assert plain.anchor == () and plain.program.anchor_abstract == ()
    penalised = Setup(optim=DRIFT, **ONE_DEVICE)
    (anchor,) = penalised.anchor
    jax.tree.map(np.testing.assert_array_equal, anchor, penalised.state["params"])
    plain_losses = plain.run(batches[:1])
    losses, drifts = _drift_run(penalised, batches[:1])
    assert losses == plain_losses and drifts == [0.0]
    jax.tree.map(np.testing.assert_array_equal, penalised.state, plain.state)
    # Later steps differ: the penalty pulls back toward theta_0, so the params move less.
    plain.run(batches[1:])
    _, drifts = _drift_run(penalised, batches[1:])
    moved = lambda s: sum(float(jnp.sum((p - a) ** 2)) for p, a in zip(jax.tree.leaves(s), jax.tree.leaves(anchor)))  # noqa: E731
    assert 0 < drifts[-1] and moved(penalised.state["params"]) < moved(plain.state["params"])


def test_bf16_anchor_is_stored_bf16_on_the_params_shardings():
    setup = Setup(MeshConfig(data=1, fsdp=8), optim=dataclasses.replace(DRIFT, drift_anchor_dtype="bfloat16"))
    (anchor,) = setup.anchor
    for a, p in zip(jax.tree.leaves(anchor), jax.tree.leaves(setup.state["params"])):
        assert a.dtype == jnp.bfloat16 and a.sharding == p.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(p.astype(jnp.bfloat16)))


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        pytest.param(MeshConfig(data=1, fsdp=8), marks=pytest.mark.slow),
        pytest.param(MeshConfig(data=2, fsdp=2, tensor=2), marks=pytest.mark.slow),
    ],
    ids=["fsdp8", "fsdp_tp_2x2x2"],
)
def test_sharded_penalised_run_equals_one_device(batches, mesh_cfg):
    one, sharded = Setup(optim=DRIFT, **ONE_DEVICE), Setup(mesh_cfg, optim=DRIFT)
    (one_losses, one_drifts), (losses, drifts) = _drift_run(one, batches), _drift_run(sharded, batches)
    np.testing.assert_allclose(losses, one_losses, rtol=2e-5)
    np.testing.assert_allclose(drifts, one_drifts, rtol=1e-4, atol=1e-9)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-5),
        sharded.state["params"],
        one.state["params"],
    )


@pytest.fixture
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["optim.drift_anchor_dtype=bfloat16"], id="full_bf16_anchor", marks=pytest.mark.slow),
        pytest.param(
            ["model.peft.method=lora", "model.peft.rank=4", "optim.learning_rate=1e-2"],
            id="lora",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_resume_with_drift_is_bitwise_and_the_anchor_is_never_checkpointed(tmp_path, _cache, extra):
    """6 steps straight == 3, stop, 3 more: the resumed run rebuilds theta_0 from the seed (or
    init_from) exactly; the checkpoint holds the same tree as a run without the penalty."""
    run = tmp_path / "run"
    args = TINY + [f"train.run_dir={run}", "train.steps=6", "checkpoint.every=3", "train.eval_every=100"]
    args += ["optim.drift_penalty=0.5", *extra]
    train(config_load.load(None, args))
    straight = read_state(run, 6)
    assert set(straight) == {"step", "params", "opt_state"}
    records = [r for r in _records(run) if "loss" in r]
    # theta_0 is the start: the first step's drift is 0, or the bf16 rounding of the start.
    assert (records[0]["drift"] == 0.0) == ("bfloat16" not in extra[0])
    assert records[-1]["drift"] > records[0]["drift"]  # the first update has learning rate 0 (warmup)
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "metrics.jsonl").unlink()
    assert train(config_load.load(None, args)).start_step == 3
    resumed = [r for r in _records(run) if "loss" in r]
    assert [(r["loss"], r["drift"]) for r in resumed] == [(r["loss"], r["drift"]) for r in records[3:]]
    jax.tree.map(np.testing.assert_array_equal, straight, read_state(run, 6))


def test_negative_penalty_is_one_line():
    with pytest.raises(ConfigError, match=r"optim.drift_penalty=-1.*non-negative"):
        config_load.load(None, ["optim.drift_penalty=-1"])


@pytest.mark.slow
def test_compiled_step_takes_the_anchor_as_one_more_argument_in_its_dtype():
    """What `jaxsft train` and `jaxsft compile` run: the bf16 anchor adds 2 bytes per trained param."""
    plain = Setup(optim=dataclasses.replace(DRIFT, drift_penalty=0.0), **ONE_DEVICE)
    penalised = Setup(optim=dataclasses.replace(DRIFT, drift_anchor_dtype="bfloat16"), **ONE_DEVICE)
    size = lambda s: s.program.compile_train(8, 32).memory_analysis().argument_size_in_bytes  # noqa: E731
    n_params = sum(x.size for x in jax.tree.leaves(plain.state["params"]))
    assert size(penalised) - size(plain) == 2 * n_params
