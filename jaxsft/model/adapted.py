"""A frozen base and a trained part that cannot be merged into it, as one model to call.

Job: LoRA, DoRA and `freeze` runs fold into plain params (peft.merged); bottleneck adapters,
prefixes and prompts do not. Generation, evaluation and chat all do `nnx.merge(graphdef,
params)` and call the model (`__call__`, `hidden_states`, `decode`, `head`, `logits`, `cfg`):
`Adapted` answers the same calls, computing exactly what the training step computes.

Contract:
    build(model_cfg, vocab_size, peft_cfg, base_params, trainable) -> (graphdef, params)
        params = {"base": the base's params, "trainable": the run's trained part}
    Adapted(base: Transformer built with cfg.peft = peft_cfg, peft_cfg, trainable)   an nnx.Module
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsft.config import ModelConfig, PeftConfig
from jaxsft.model import peft
from jaxsft.model.transformer import Transformer


class Adapted(nnx.Module):
    def __init__(self, base: Transformer, peft_cfg: PeftConfig, trainable: dict):
        self.base = base
        self.peft_cfg = peft_cfg
        self.trainable = nnx.data(jax.tree.map(nnx.Param, trainable))

    @property
    def cfg(self) -> ModelConfig:
        return self.base.cfg

    @property
    def vocab_size(self) -> int:
        return self.base.vocab_size

    def _inputs(self):
        """(blocks, prefix) as the train step hands them to the model (peft.model_inputs, peft.prefix)."""
        trainable = jax.tree.map(lambda v: v[...], self.trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
        blocks = [(nnx.state(self.base.blocks), trainable["blocks"])] if self.peft_cfg.method == "adapter" else None
        return blocks, peft.prefix(self.peft_cfg, trainable, self.base)

    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        return self.logits(self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT))

    def hidden_states(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        blocks, prefix = self._inputs()
        return self.base.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT, blocks, None, prefix)

    def decode(self, tokens_BxT, positions_BxT, valid_BxT, cache, index):
        blocks, prefix = self._inputs()
        return self.base.decode(tokens_BxT, positions_BxT, valid_BxT, cache, index, blocks, prefix)

    def head(self):
        return self.base.head()

    def logits(self, h_BxTxD):
        return self.base.logits(h_BxTxD)


def build(model_cfg: ModelConfig, vocab_size: int, peft_cfg: PeftConfig, base_params: dict, trainable: dict):
    """(graphdef, params) of the base with its non-mergeable trained part; nothing is copied."""
    cfg = dataclasses.replace(model_cfg, peft=peft_cfg)  # the layer scan runs the method's hook
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trainable)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(
            lambda: Adapted(
                Transformer(cfg, vocab_size, rngs=nnx.Rngs(0)),
                peft_cfg,
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
            )
        )
    return nnx.graphdef(model), {"base": base_params, "trainable": trainable}
