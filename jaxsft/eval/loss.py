"""Loss, perplexity and token accuracy on the trained tokens of eval records, per group.

Contract:
    loss_by_group(graphdef, params, groups, data_cfg, tokenizer, rows, drops)
        -> {group: (loss_sum, weight, correct, examples)}
        groups: {key: [conversation, ...]}; each group is encoded (pipeline.Encoder: the
        template, masks and truncation of training) and packed on its own, so its sums
        are its records' alone. Drops (no trained token, overlong under `drop`) are counted
        by reason into `drops`.

The sums are those of the trainer's eval (`cross_entropy_sum` on the same masked
targets), so the loss over all records equals the held-out loss a run logs when its
eval batches cover the same records. Packing changes nothing but rounding (invariant 4).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.config import DataConfig
from jaxsft.data.formats import Conversation
from jaxsft.data.pipeline import READ_OPTIONS, Encoder, Records, is_example, pack_and_batch
from jaxsft.train.loss import cross_entropy_sum


@functools.partial(jax.jit, static_argnums=0)
def token_sums(graphdef, params, batch: dict):
    """(weighted loss sum, weight sum, weight of targets that are the argmax) of one batch."""
    model = nnx.merge(graphdef, params)
    hidden_BxTxD = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"])
    logits_BxTxV = model.logits(hidden_BxTxD)
    loss_sum, weight = cross_entropy_sum(logits_BxTxV, batch["targets"], batch["loss_weights"])
    hit_BxT = jnp.argmax(logits_BxTxV, axis=-1) == batch["targets"]
    correct = jnp.sum(jnp.where(hit_BxT, batch["loss_weights"].astype(jnp.float32), 0.0))
    return loss_sum, weight, correct


def _padded(batch: dict, rows: int, pad_id: int) -> dict:
    """Padding rows (weight 0) so every batch has one shape and one compilation."""
    missing = rows - len(batch["inputs"])
    fill = {"inputs": pad_id, "targets": pad_id}
    return {
        k: np.concatenate([v, np.full((missing, v.shape[1]), fill.get(k, 0), v.dtype)]) if missing else v
        for k, v in batch.items()
    }


def _batches(conversations: Sequence[Conversation], data_cfg: DataConfig, tokenizer, rows: int):
    # `concat` packing runs examples across rows; first_fit keeps each whole, as the trainer's eval does.
    cfg = dataclasses.replace(data_cfg, packing="first_fit") if data_cfg.packing == "concat" else data_cfg
    ds = Records(list(conversations)).map(Encoder(cfg, tokenizer)).filter(is_example).to_iter_dataset(READ_OPTIONS)
    for batch in pack_and_batch(ds, cfg, rows, tokenizer.pad_id, seed=0, shuffle_bins=False, drop_remainder=False):
        yield _padded(batch, rows, tokenizer.pad_id)


def loss_by_group(
    graphdef,
    params,
    groups: dict[Hashable, list[Conversation]],
    data_cfg: DataConfig,
    tokenizer,
    rows: int,
    drops: dict[str, int],
) -> dict[Hashable, tuple[float, float, float, int]]:
    encoder = Encoder(data_cfg, tokenizer)
    out = {}
    for key, conversations in groups.items():
        kept = []
        for conversation in conversations:
            encoded = encoder.encode(conversation)
            if isinstance(encoded, str):
                drops[encoded] = drops.get(encoded, 0) + 1
            else:
                kept.append(conversation)
        loss_sum = weight = correct = 0.0
        for batch in _batches(kept, data_cfg, tokenizer, rows) if kept else ():
            s, w, c = token_sums(graphdef, params, batch)
            loss_sum, weight, correct = loss_sum + float(s), weight + float(w), correct + float(c)
        out[key] = (loss_sum, weight, correct, len(kept))
    return out
