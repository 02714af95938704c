"""Pure train and eval steps: state and batch in, state and metrics out.

The train state is a plain dict `{step, params, opt_state}`; `params` is the model's
pure-dict state and the model is rebuilt from it with `nnx.merge(graphdef, params)`
inside the traced function (the graph definition is static), which is how the step
stays a plain `jax.jit` function with explicit shardings.

Gradient accumulation runs the micro-batches under `lax.scan` and sums *unnormalised*
losses and gradients; the division by the step's total loss weight happens once, so
K micro-batches give the same update as one batch of the same rows (invariant 5).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxsft.config import LoraConfig
from jaxsft.train.loss import cross_entropy_sum

Batch = dict[str, jax.Array]


def init_state(params, optimizer: optax.GradientTransformation) -> dict[str, Any]:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def logits_fn(graphdef, params, batch: Batch, adapters=None, lora_cfg: LoraConfig | None = None) -> jax.Array:
    model = nnx.merge(graphdef, params)
    blocks = None if adapters is None else adapters["blocks"]
    return model(batch["inputs"], batch["positions"], batch["segment_ids"], blocks, lora_cfg)


def loss_sums(graphdef, params, batch: Batch, adapters=None, lora_cfg: LoraConfig | None = None):
    """(weighted loss sum, weight sum) of one (micro-)batch; with LoRA `params` is the frozen base."""
    logits = logits_fn(graphdef, params, batch, adapters, lora_cfg)
    return cross_entropy_sum(logits, batch["targets"], batch["loss_weights"])


def _loss(graphdef, trainable, base, batch: Batch, lora_cfg: LoraConfig | None):
    if lora_cfg is None:
        return loss_sums(graphdef, trainable, batch)
    return loss_sums(graphdef, base, batch, trainable, lora_cfg)


def split_micro_batches(batch: Batch, micro_batches: int, constrain: Callable) -> Batch:
    """[B, T] -> [M, B/M, T] with row r in micro-batch r % M.

    Taking every M-th row (rather than contiguous blocks) keeps each micro-batch spread
    over all devices that hold the batch, so no device idles while another works.
    """
    def split(x_BxT):
        rows, length = x_BxT.shape
        return constrain(x_BxT.reshape(rows // micro_batches, micro_batches, length).swapaxes(0, 1))
    return jax.tree.map(split, batch)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    micro_batches: int = 1, constrain_micro: Callable = lambda x: x,
                    lora_cfg: LoraConfig | None = None):
    """`train_step(state, batch, base=None)`; with `lora_cfg`, state["params"] are the adapters and
    `base` the frozen params: only the adapters are differentiated and updated."""
    grad_fn = jax.value_and_grad(lambda p, base, b: _loss(graphdef, p, base, b, lora_cfg), has_aux=True)

    def accumulate(params, base, batch: Batch):
        if micro_batches == 1:
            (loss_sum, _), grads = grad_fn(params, base, batch)
            return loss_sum, grads
        micro = split_micro_batches(batch, micro_batches, constrain_micro)

        def body(carry, mb):
            loss_acc, grads_acc = carry
            (loss_sum, _), grads = grad_fn(params, base, mb)
            return (loss_acc + loss_sum, jax.tree.map(jnp.add, grads_acc, grads)), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (loss_sum, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
        return loss_sum, grads

    def train_step(state, batch: Batch, base=None):
        weight = jnp.sum(batch["loss_weights"].astype(jnp.float32))
        loss_sum, grads = accumulate(state["params"], base, batch)
        # A step with no trained target (cannot come from the pipeline, which drops such
        # examples) changes nothing rather than dividing by zero.
        denominator = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grads, state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss_sum / denominator,
            "grad_norm": optax.global_norm(grads),
            "learning_rate": schedule(state["step"]),
            "trained_tokens": weight,
            "tokens": jnp.sum(batch["segment_ids"] > 0),
        }
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_eval_step(graphdef, lora_cfg: LoraConfig | None = None):
    def eval_step(params, batch: Batch, base=None):
        return _loss(graphdef, params, base, batch, lora_cfg)
    return eval_step
