"""Pure train and eval steps: state and batch in, state and metrics out.

The train state is a plain dict `{step, params, opt_state}`; `params` is the model's
pure-dict state and the model is rebuilt from it with `nnx.merge(graphdef, params)`
inside the traced function (the graph definition is static), which is how the step
stays a plain `jax.jit` function with explicit shardings.

Gradient accumulation runs the micro-batches under `lax.scan` and sums *unnormalised*
losses and gradients; the division by the step's total loss weight happens once, so
K micro-batches give the same update as one batch of the same rows (invariant 5).

The drift penalty (L2-SP, `optim.drift_penalty` = lambda) is added once per optimizer
step, after that division: a step minimises CE_sum / W + lambda * ||theta - theta_0||^2
over the trainable params, whatever the micro-batches, devices or trained tokens.
theta_0 (`anchor`) is an argument, never differentiated; its gradient 2 (theta - theta_0)
is written out in float32, and `drift` = ||theta - theta_0||^2 before the update is logged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.config import PeftConfig
from jaxsft.model import peft
from jaxsft.train.loss import chunked_cross_entropy_sum, cross_entropy_sum

Batch = dict[str, jax.Array]


def init_state(params, optimizer: optax.GradientTransformation) -> dict[str, Any]:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def loss_sums(
    graphdef,
    params,
    batch: Batch,
    frozen=None,
    peft_cfg: PeftConfig = PeftConfig(),
    key: jax.Array | None = None,
    loss_chunk: int = 0,
):
    """(weighted loss sum, weight sum) of one (micro-)batch; with PEFT `params` are the trainable
    part and `frozen` the rest.

    `loss_chunk` > 0 computes the cross-entropy from the hidden states `loss_chunk` tokens
    at a time (loss.chunked_cross_entropy_sum): the [B, T, V] float32 logits never exist."""
    merged, blocks = peft.model_inputs(peft_cfg, params, frozen)
    model = nnx.merge(graphdef, merged)
    prefix = peft.prefix(peft_cfg, params, model)  # prefix / prompt tuning: per-layer keys/values first
    hidden_BxTxD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"], blocks, key, prefix)
    if loss_chunk:
        return chunked_cross_entropy_sum(
            hidden_BxTxD,
            model.head(),
            batch["targets"],
            batch["loss_weights"],
            loss_chunk,
            model.cfg.final_logit_softcap,
            dtype=jnp.dtype(model.cfg.dtype),
        )
    return cross_entropy_sum(model.logits(hidden_BxTxD), batch["targets"], batch["loss_weights"])


def drift_and_grad(params, anchor) -> tuple[jax.Array, Any]:
    """(||params - anchor||^2, its gradient 2 (params - anchor)) in float32, over every leaf."""
    diffs = jax.tree.map(lambda p, a: p.astype(jnp.float32) - a.astype(jnp.float32), params, anchor)
    drift = sum((jnp.sum(jnp.square(d)) for d in jax.tree.leaves(diffs)), jnp.zeros((), jnp.float32))
    return drift, jax.tree.map(lambda d: 2.0 * d, diffs)


def split_micro_batches(batch: Batch, micro_batches: int, constrain: Callable) -> Batch:
    """[B, T] -> [M, B/M, T] with row r in micro-batch r % M.

    Taking every M-th row (rather than contiguous blocks) keeps each micro-batch spread
    over all devices that hold the batch, so no device idles while another works.
    """

    def split(x_BxT):
        rows, length = x_BxT.shape
        return constrain(x_BxT.reshape(rows // micro_batches, micro_batches, length).swapaxes(0, 1))

    return jax.tree.map(split, batch)


def make_train_step(
    *,
    graphdef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    micro_batches: int = 1,
    constrain_micro: Callable = lambda x: x,
    peft_cfg: PeftConfig = PeftConfig(),
    seed: int = 0,
    loss_chunk: int = 0,
    drift_penalty: float = 0.0,
):
    """`train_step(state, batch, frozen=None, anchor=None)`; with PEFT (peft.py) state["params"] are the trainable
    part and `frozen` the rest: only the trainable part is differentiated and updated.

    Adapter dropout draws from a key that is a function of (seed, step, micro-batch), so a
    resumed run drops exactly what the uninterrupted run would have. `anchor` (the starting
    trainable params) is given when `drift_penalty` > 0."""
    grad_fn = jax.value_and_grad(
        lambda p, frozen, b, key: loss_sums(graphdef, p, b, frozen, peft_cfg, key, loss_chunk), has_aux=True
    )
    dropout = peft_cfg.adapters and peft_cfg.dropout > 0

    def accumulate(params, frozen, batch: Batch, step):
        step_key = jax.random.fold_in(jax.random.key(seed), step) if dropout else None
        key = lambda i: None if step_key is None else jax.random.fold_in(step_key, i)  # noqa: E731
        if micro_batches == 1:
            (loss_sum, _), grads = grad_fn(params, frozen, batch, key(0))
            return loss_sum, grads
        micro = split_micro_batches(batch, micro_batches, constrain_micro)

        def body(carry, xs):
            loss_acc, grads_acc = carry
            i, mb = xs
            (loss_sum, _), grads = grad_fn(params, frozen, mb, key(i))
            return (loss_acc + loss_sum, jax.tree.map(jnp.add, grads_acc, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss_sum, grads), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.float32), zeros), (jnp.arange(micro_batches), micro)
        )
        return loss_sum, grads

    def update(grads, params, opt_state):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def train_step(state, batch: Batch, frozen=None, anchor=None):
        weight = jnp.sum(batch["loss_weights"].astype(jnp.float32))
        loss_sum, grads = accumulate(state["params"], frozen, batch, state["step"])
        # A step with no trained target (cannot come from the pipeline, which drops such
        # examples) changes nothing rather than dividing by zero.
        denominator = jnp.maximum(weight, 1.0)
        if anchor is None:
            grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state["params"])
        else:
            drift, drift_grads = drift_and_grad(state["params"], anchor)
            grads = jax.tree.map(
                lambda g, d, p: (g / denominator + drift_penalty * d).astype(p.dtype),
                grads,
                drift_grads,
                state["params"],
            )
        loss, grad_norm = loss_sum / denominator, optax.global_norm(grads)
        # A non-finite loss or gradient skips the update: params and optimizer state stay as
        # they were, the step counter still advances (the data position and the schedule stay
        # those of the uninterrupted run); the trainer counts consecutive skips (train/guard.py).
        # A `cond`, not a select per leaf: a select keeps old and new trees alive together
        # (one more copy of params and moments in temporaries).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        params, opt_state = jax.lax.cond(
            finite, update, lambda g, p, o: (p, o), grads, state["params"], state["opt_state"]
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state["step"]),
            "trained_tokens": weight,
            "tokens": jnp.sum(batch["segment_ids"] > 0),
            "skipped": (~finite).astype(jnp.float32),
        }
        if anchor is not None:
            metrics["drift"] = drift
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_eval_step(*, graphdef, peft_cfg: PeftConfig = PeftConfig(), loss_chunk: int = 0):
    def eval_step(params, batch: Batch, frozen=None):
        return loss_sums(graphdef, params, batch, frozen, peft_cfg, loss_chunk=loss_chunk)

    return eval_step
