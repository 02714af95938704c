"""The decoder: one transformer for every supported family, as a Flax NNX module.

Job: tokens -> float32 next-token logits for packed rows, and the same computation one
step at a time over a KV cache for generation.

Contract:
    Transformer(cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs)
    model(tokens_BxT, positions_BxT, segment_ids_BxT, blocks=None, key=None, prefix=None) -> logits_BxTxV (float32)
    model.hidden_states(same arguments) -> h_BxTxD;  model.head() -> w_DxV;  model.logits(h_BxTxD) -> logits
    model.decode(tokens_BxT, positions_BxT, valid_BxT, cache, index, blocks=None, prefix=None)
        -> (logits_BxTxV, cache)
    model.virtual_kv(x_WxD, blocks=None) -> {"k", "v"}: [L, W, K, H] of W input vectors at positions 0..W-1
    init_cache(cfg, batch, length) -> cache
    abstract_model(cfg, vocab_size) -> Transformer whose params are ShapeDtypeStructs (no allocation)
    abstract_params(cfg, vocab_size) -> the params' tree (`nnx.state(model, nnx.Param).to_pure_dict()`
        layout) of ShapeDtypeStructs;  param_count(cfg, vocab_size) -> int

- Packed rows: `positions` restart at 0 in every segment and drive the rotary embedding;
  `segment_ids` (0 = padding) keep attention inside a segment. A packed row gives each
  example the logits it would get alone.
- The n_layers blocks are ONE stacked module (`blocks`): each of its params has a leading
  axis of size n_layers named 'layers'. They run under `jax.lax.scan` (compile time
  independent of depth) or, with `scan_layers=False`, a python loop over the same params.
  Per-layer differences (Gemma 2's alternating sliding window) are data scanned along
  with the params, never a second block type.
- Parameter-efficient fine-tuning (peft.py) hands the layer stack in as `blocks`: a list
  of segments (stacked params of consecutive layers, LoRA/DoRA adapters or None), run
  one scan each in order. Frozen segments below every trained param are then outside
  the differentiated computation altogether. Bottleneck adapters ride in the same slot
  (their hook acts on the branch outputs, bottleneck.py).
- Prefix and prompt tuning (prompts.py) hand in `prefix`: per layer W keys/values [L, W, K, H]
  that every query sees first; the real tokens' positions are then offset by W, as when the
  W virtual tokens sit before every example (Hugging Face PEFT's convention).
- Family switches live in families.py and layers.py; `cfg.preset` is applied here too.
- Shape suffixes (`x_BxTxD`) follow the one key in jaxsft/model/__init__.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen, nnx

from jaxsft.config import ModelConfig
from jaxsft.model import bottleneck, lora_branch, quant
from jaxsft.model import dense as dense_lib
from jaxsft.model.attention import attention, masked_attention, with_prefix
from jaxsft.model.dense import dense
from jaxsft.model.families import layer_windows, resolve, variant
from jaxsft.model.layers import (
    ACTIVATION_AXES,
    Block,
    RMSNorm,
    apply_rope,
    constrain,
    param,
    rope_frequencies,
    rope_tables,
)

__all__ = [
    "Transformer",
    "abstract_model",
    "abstract_params",
    "param_count",
    "init_cache",
    "rope_tables",
    "apply_rope",
    "rope_frequencies",
]
_policies = jax.checkpoint_policies
_DENSE = _policies.save_only_these_names(dense_lib.NAME)  # the projections' outputs (model/dense.py)
_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": _policies.save_from_both_policies(_policies.dots_saveable, _DENSE),
    "dots_with_no_batch_dims_saveable": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable, _DENSE
    ),
    # The projections' outputs (the block's matmuls without batch dims), kept in host memory
    # between forward and backward (TPU, GPU).
    "offload": _policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[],
        names_which_can_be_offloaded=[dense_lib.NAME],
        offload_src="device",
        offload_dst="pinned_host",
    ),
}


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """n_layers blocks as one module whose params gain a leading 'layers' axis."""

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return make(rngs)


# ---------------------------------------------------------------------------- model


def _check_config(cfg: ModelConfig, vocab_size: int) -> None:
    if cfg.remat != "none" and cfg.remat not in _REMAT_POLICIES:
        raise ValueError(f"model.remat={cfg.remat!r}: expected one of none, {', '.join(_REMAT_POLICIES)}")
    if cfg.n_heads % cfg.n_kv_heads or cfg.head_dim % 2:
        raise ValueError(
            f"model: n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.n_kv_heads} "
            f"and head_dim={cfg.head_dim} even"
        )
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}: expected a positive number")


class Transformer(nnx.Module):
    """Embedding -> n_layers stacked blocks -> final norm -> head (or tied embedding)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        cfg = resolve(cfg)
        _check_config(cfg, vocab_size)
        self.cfg = cfg
        self.vocab_size = vocab_size
        init = nnx.initializers.normal(cfg.init_std)
        self.embedding = param(rngs, init, (vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(
            cfg.d_model, cfg.norm_eps, cfg.param_dtype, variant(cfg.family).norm_offset, rngs=rngs
        )
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, init, (cfg.d_model, vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, blocks=None, key=None, prefix=None) -> jax.Array:
        """`blocks`: [(stacked block params, adapters or None), ...] replacing the model's own layer
        stack (peft.py); `key`: the adapters' dropout key (training only); `prefix`: {"k", "v"}
        [L, W, K, H] every query sees first (prompts.py)."""
        return self.logits(self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT, blocks, key, prefix))

    def hidden_states(
        self, tokens_BxT, positions_BxT, segment_ids_BxT, blocks=None, key=None, prefix=None
    ) -> jax.Array:
        """The final-normed hidden states [B, T, D] the head reads (chunked losses start here)."""
        cfg = self.cfg
        scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else cfg.head_dim**-0.5

        def attend(window, *layer_prefix):
            def fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
                return attention(
                    q_BxTxNxH,
                    k_BxTxKxH,
                    v_BxTxKxH,
                    segment_ids_BxT,
                    scale=scale,
                    softcap=cfg.attn_logit_softcap,
                    window=window,
                    implementation=cfg.attention,
                    prefix=layer_prefix or None,
                ), None

            return fn

        if prefix is not None:  # the real tokens come after the W virtual ones
            positions_BxT = positions_BxT + prefix["k"].shape[1]
        x_BxTxD, cos_BxTxH, sin_BxTxH = self._embed(tokens_BxT, positions_BxT)
        layer_prefix = None if prefix is None else (prefix["k"], prefix["v"])
        x_BxTxD, _ = self._run_blocks(x_BxTxD, cos_BxTxH, sin_BxTxH, attend, layer_prefix, blocks, key)
        return self.final_norm(x_BxTxD)

    def virtual_kv(self, x_WxD, blocks=None) -> dict:
        """Each layer's keys/values [L, W, K, H] (rotated, as a KV cache holds them) of W input
        vectors (as the first block reads them: Gemma's embedding scale is theirs to carry,
        as Hugging Face PEFT's prompts do) run causally at positions 0..W-1."""
        cfg = self.cfg
        scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else cfg.head_dim**-0.5
        n = x_WxD.shape[0]
        segment_ids_1xW = jnp.ones((1, n), jnp.int32)

        def attend(window):
            def fn(q_1xWxNxH, k_1xWxKxH, v_1xWxKxH):
                out = attention(
                    q_1xWxNxH, k_1xWxKxH, v_1xWxKxH, segment_ids_1xW, scale=scale, softcap=cfg.attn_logit_softcap
                )
                return out, (k_1xWxKxH[0], v_1xWxKxH[0])

            return fn

        positions_1xW = jnp.arange(n, dtype=jnp.int32)[None]
        # One row that every example shares: replicated over the batch's mesh axes, not split
        # (a 1-row batch split over data x fsdp deadlocked XLA's CPU collectives with tensor > 1).
        rules = tuple(r for r in linen.get_logical_axis_rules() if r[0] != "batch")
        with linen.logical_axis_rules((("batch", None), *rules)):
            x_1xWxD, cos_1xWxH, sin_1xWxH = self._embed_vectors(x_WxD[None], positions_1xW)
            _, (k_LxWxKxH, v_LxWxKxH) = self._run_blocks(x_1xWxD, cos_1xWxH, sin_1xWxH, attend, None, blocks)
        return {"k": k_LxWxKxH, "v": v_LxWxKxH}

    def decode(self, tokens_BxT, positions_BxT, valid_BxT, cache, index, blocks=None, prefix=None):
        """Runs T new tokens per row against the cache, writing them at slots [index, index + T).

        A cached key is visible to a query when it is valid (position >= 0), no later than
        the query's position, and within the layer's window: rows of different prompt
        lengths share one set of slots. Returns (logits_BxTxV, updated cache). `blocks` and
        `prefix` as in `__call__`: the prefix is seen by every query, not stored in the cache,
        and `positions` are those of the real tokens (offset by W here, as in training).
        """
        cfg = self.cfg
        if prefix is not None:
            positions_BxT = positions_BxT + prefix["k"].shape[1]
        scale = cfg.query_pre_attn_scalar**-0.5 if cfg.query_pre_attn_scalar else cfg.head_dim**-0.5
        new_positions_BxT = jnp.where(valid_BxT, positions_BxT, -1).astype(jnp.int32)
        key_positions_BxS = jax.lax.dynamic_update_slice(cache["positions"], new_positions_BxT, (0, index))
        distance_BxTxS = positions_BxT[:, :, None] - key_positions_BxS[:, None, :]
        visible_BxTxS = (key_positions_BxS[:, None, :] >= 0) & (distance_BxTxS >= 0)

        def attend(window, k_cache_BxSxKxH, v_cache_BxSxKxH, *layer_prefix):
            def fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
                k_all = jax.lax.dynamic_update_slice(
                    k_cache_BxSxKxH, k_BxTxKxH.astype(k_cache_BxSxKxH.dtype), (0, index, 0, 0)
                )
                v_all = jax.lax.dynamic_update_slice(
                    v_cache_BxSxKxH, v_BxTxKxH.astype(v_cache_BxSxKxH.dtype), (0, index, 0, 0)
                )
                mask_BxTxS = visible_BxTxS
                if window is not None:
                    mask_BxTxS = mask_BxTxS & ((window <= 0) | (distance_BxTxS < window))
                out = masked_attention(
                    q_BxTxNxH,
                    *with_prefix(
                        k_all.astype(q_BxTxNxH.dtype), v_all.astype(q_BxTxNxH.dtype), mask_BxTxS, layer_prefix or None
                    ),
                    scale,
                    cfg.attn_logit_softcap,
                )
                return out, (k_all, v_all)

            return fn

        x_BxTxD, cos_BxTxH, sin_BxTxH = self._embed(tokens_BxT, positions_BxT)
        caches = (cache["k"], cache["v"]) + (() if prefix is None else (prefix["k"], prefix["v"]))
        x_BxTxD, (k_L, v_L) = self._run_blocks(x_BxTxD, cos_BxTxH, sin_BxTxH, attend, caches, blocks)
        return self.logits(self.final_norm(x_BxTxD)), {"k": k_L, "v": v_L, "positions": key_positions_BxS}

    def _embed(self, tokens_BxT, positions_BxT):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x_BxTxD = jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(dt)
        if variant(cfg.family).embed_scale:
            # Gemma: the multiplier is rounded to the compute dtype first, as in the reference.
            x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(cfg.d_model), dt)
        return self._embed_vectors(x_BxTxD, positions_BxT)

    def _embed_vectors(self, x_BxTxD, positions_BxT):
        """Input vectors as the first block reads them, and their rotary tables."""
        cfg = self.cfg
        x_BxTxD = x_BxTxD.astype(jnp.dtype(cfg.dtype))
        cos_BxTxH, sin_BxTxH = rope_tables(positions_BxT, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        return constrain(x_BxTxD, ACTIVATION_AXES), cos_BxTxH, sin_BxTxH

    def head(self) -> jax.Array:
        """The output projection [D, V] in the compute dtype (the embedding's transpose when tied)."""
        dt = jnp.dtype(self.cfg.dtype)
        return self.embedding[...].astype(dt).T if self.cfg.tie_embeddings else self.lm_head[...].astype(dt)

    def logits(self, h_BxTxD):
        """float32 logits of final-normed hidden states, soft-capped where the family does."""
        logits_BxTxV = dense(h_BxTxD, self.head(), 1, jnp.float32)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)
        if self.cfg.final_logit_softcap:
            cap = self.cfg.final_logit_softcap
            logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
        return constrain(logits_BxTxV, ("batch", "length", "vocab"))

    def _run_blocks(self, x_BxTxD, cos_BxTxH, sin_BxTxH, attend, caches, blocks=None, key=None):
        """Scan (or loop) one block's pure function over the stacked params, segment by segment.

        `attend(window, *layer_caches)` builds the layer's attention; `caches` is a tuple
        of [L, ...] arrays scanned along with the params (decode: the KV cache; training: a
        prefix, or None).
        """
        graphdef, stacked_state = nnx.split(self.blocks)
        segments = blocks or [(stacked_state, None)]
        windows = layer_windows(self.cfg)
        windows_L = jnp.asarray(windows, jnp.int32) if any(windows) else None
        peft_cfg = self.cfg.peft

        def body(x_BxTxD, xs):
            layer_state, window, layer_caches, layer_adapters, layer = xs
            block = nnx.merge(graphdef, quant.dequantize_layer(layer_state))  # QLoRA: this layer's kernels only
            if peft_cfg.method == "adapter":
                adapt = bottleneck.layer_hook(layer_adapters, peft_cfg)
            else:
                adapt = lora_branch.layer_hook(
                    layer_adapters, peft_cfg, None if key is None else jax.random.fold_in(key, layer)
                )
            return block(x_BxTxD, cos_BxTxH, sin_BxTxH, attend(window, *(layer_caches or ())), adapt)

        if self.cfg.remat != "none":
            # prevent_cse only matters outside scan; inside it just blocks XLA optimisations.
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=not self.cfg.scan_layers)
        elif any(quant.quantized_stack(state) for state, _ in segments):
            # QLoRA without remat: keep the matmul outputs; never the layers' dequantised kernels.
            policy = _REMAT_POLICIES["dots_with_no_batch_dims_saveable"]
            body = jax.checkpoint(body, policy=policy, prevent_cse=not self.cfg.scan_layers)
        start, outs = 0, []
        for segment_state, segment_adapters in segments:
            n = jax.tree.leaves(segment_state)[0].shape[0]
            layers = slice(start, start + n)
            xs = (
                segment_state,
                None if windows_L is None else windows_L[layers],
                caches if len(segments) == 1 else jax.tree.map(lambda c: c[layers], caches),
                segment_adapters,
                jnp.arange(start, start + n, dtype=jnp.int32),
            )
            start += n
            if self.cfg.scan_layers:
                x_BxTxD, out = jax.lax.scan(body, x_BxTxD, xs)
                outs.append(out)
                continue
            for i in range(n):
                x_BxTxD, out = body(x_BxTxD, jax.tree.map(lambda a: a[i], xs))
                outs.append(None if out is None else jax.tree.map(lambda a: a[None], out))
        if outs[0] is None:
            return x_BxTxD, None
        return x_BxTxD, jax.tree.map(lambda *a: jnp.concatenate(a), *outs)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots per row (positions -1 mark empty slots)."""
    cfg = resolve(cfg)
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "positions": jnp.full((batch, length), -1, jnp.int32),
    }


def abstract_model(cfg: ModelConfig, vocab_size: int) -> Transformer:
    """The model with ShapeDtypeStruct params (shapes, dtypes, logical axes): its graphdef, specs, sizes."""
    with nnx.use_eager_sharding(False):
        return nnx.eval_shape(lambda: Transformer(cfg, vocab_size, rngs=nnx.Rngs(0)))


def abstract_params(cfg: ModelConfig, vocab_size: int) -> dict:
    """The params as a pure dict tree of ShapeDtypeStructs, laid out like the train state's params."""
    params = nnx.state(abstract_model(cfg, vocab_size), nnx.Param).to_pure_dict()
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg, vocab_size)))
