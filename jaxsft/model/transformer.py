"""The decoder: a Llama-kind transformer as a Flax NNX module.

Job: tokens -> float32 next-token logits for packed rows.

Contract:
    Transformer(cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs)
    model(tokens_BxT, positions_BxT, segment_ids_BxT) -> logits_BxTxV (float32)
    param_count(cfg, vocab_size) -> int      (no allocation)

- Packed rows: `positions` restart at 0 in every segment and drive the rotary embedding;
  `segment_ids` (0 = padding) keep attention inside a segment. A packed row gives each
  example the logits it would get alone.
- Every nnx.Param carries logical axis names (`out_sharding` metadata, length == ndim);
  no mesh axis name appears here. The trainer maps names to mesh axes in one table.
- The n_layers blocks are ONE stacked module (`blocks`): each of its params has a leading
  axis of size n_layers named 'layers'. They run under `jax.lax.scan` (compile time
  independent of depth) or, with `scan_layers=False`, a python loop over the same params.
- Params are stored in `param_dtype`, matmuls run in `dtype`; norms, rotary tables,
  softmax and the logits are float32.
- Parameter names follow Hugging Face Llama (`q_proj`, `gate_proj`, ...) so the checkpoint
  mapping is a rename plus a reshape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from jaxsft.config import ModelConfig
from jaxsft.model.attention import attention

ACTIVATION_AXES = ("batch", "length", "embed")
_REMAT_POLICIES = {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable}


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    # eager_sharding=False: flax 0.12 otherwise places every annotated variable on the
    # ambient mesh at creation, which fails with no mesh and cannot read logical names.
    # Placement is the trainer's job (jit with out_shardings from the logical specs).
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


def _constrain(x, names: tuple[str, ...]):
    """Logical sharding hint; a no-op unless the caller activated axis rules and a mesh."""
    return nn.with_logical_constraint(x, names)


# ---------------------------------------------------------------------------- layers


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        # Statistics in float32: a bfloat16 mean of squares loses the small components.
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        inv_rms_BxTx1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True) + self.eps)
        return (x32_BxTxD * inv_rms_BxTx1 * self.scale[...].astype(jnp.float32)).astype(x_BxTxD.dtype)


def rope_tables(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotary angles, float32, in the rotate_half layout (halves repeated)."""
    inv_freq_F = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_F
    angles_BxTxH = jnp.concatenate([angles_BxTxF, angles_BxTxF], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Llama/HF `rotate_half`: pairs are (i, i + H/2), not interleaved (i, i + 1)."""
    x32_BxTxNxH = x_BxTxNxH.astype(jnp.float32)
    first, second = jnp.split(x32_BxTxNxH, 2, axis=-1)
    rotated_BxTxNxH = jnp.concatenate([-second, first], axis=-1)
    out = x32_BxTxNxH * cos_BxTxH[:, :, None] + rotated_BxTxNxH * sin_BxTxH[:, :, None]
    return out.astype(x_BxTxNxH.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, pdt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        init = nnx.initializers.normal(cfg.init_std)
        # Residual-branch outputs scaled down so the residual stream's variance does not
        # grow with depth (GPT-2 / nanodo init); irrelevant once HF weights are loaded.
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.q_proj = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pdt)
        self.k_proj = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_proj = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        self.o_proj = _param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), pdt)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT):
        dt = self.dtype
        q_BxTxNxH = jnp.einsum("btd,dnh->btnh", x_BxTxD, self.q_proj[...].astype(dt))
        k_BxTxKxH = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.k_proj[...].astype(dt))
        v_BxTxKxH = jnp.einsum("btd,dkh->btkh", x_BxTxD, self.v_proj[...].astype(dt))
        q_BxTxNxH = _constrain(apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH), ("batch", "length", "heads", "head_dim"))
        k_BxTxKxH = _constrain(apply_rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH), ("batch", "length", "kv_heads", "head_dim"))
        v_BxTxKxH = _constrain(v_BxTxKxH, ("batch", "length", "kv_heads", "head_dim"))
        out_BxTxNxH = attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
        return jnp.einsum("btnh,nhd->btd", out_BxTxNxH, self.o_proj[...].astype(dt))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pdt = cfg.d_model, cfg.d_ff, cfg.param_dtype
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.gate_proj = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.up_proj = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.down_proj = _param(rngs, out_init, (f, d), ("mlp", "embed"), pdt)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxTxD):
        dt = self.dtype
        gate_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, self.gate_proj[...].astype(dt))
        up_BxTxF = jnp.einsum("btd,df->btf", x_BxTxD, self.up_proj[...].astype(dt))
        hidden_BxTxF = _constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "length", "mlp"))
        return jnp.einsum("btf,fd->btd", hidden_BxTxF, self.down_proj[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT):
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), cos_BxTxH, sin_BxTxH, segment_ids_BxT)
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD))
        return _constrain(x_BxTxD, ACTIVATION_AXES)


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
        raise ValueError(f"model: n_heads={cfg.n_heads} must be a multiple of n_kv_heads={cfg.n_kv_heads} "
                         f"and head_dim={cfg.head_dim} even")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}: expected a positive number")


class Transformer(nnx.Module):
    """Embedding -> n_layers stacked blocks -> final norm -> head (or tied embedding)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, *, rngs: nnx.Rngs):
        _check_config(cfg, vocab_size)
        self.cfg = cfg
        self.vocab_size = vocab_size
        init = nnx.initializers.normal(cfg.init_std)
        self.embedding = _param(rngs, init, (vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
        self.blocks = _stacked_blocks(cfg, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, init, (cfg.d_model, vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT) -> jax.Array:
        dt = jnp.dtype(self.cfg.dtype)
        x_BxTxD = jnp.take(self.embedding[...], tokens_BxT, axis=0).astype(dt)
        x_BxTxD = _constrain(x_BxTxD, ACTIVATION_AXES)
        cos_BxTxH, sin_BxTxH = rope_tables(positions_BxT, self.cfg.head_dim, self.cfg.rope_theta)
        x_BxTxD = self._run_blocks(x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT)
        x_BxTxD = self.final_norm(x_BxTxD)
        if self.cfg.tie_embeddings:
            logits_BxTxV = jnp.einsum("btd,vd->btv", x_BxTxD, self.embedding[...].astype(dt),
                                      preferred_element_type=jnp.float32)
        else:
            logits_BxTxV = jnp.einsum("btd,dv->btv", x_BxTxD, self.lm_head[...].astype(dt),
                                      preferred_element_type=jnp.float32)
        return _constrain(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))

    def _run_blocks(self, x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT):
        """Scan (or loop) one block's pure function over the stacked params."""
        graphdef, stacked_state = nnx.split(self.blocks)

        def body(x_BxTxD, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT), None

        if self.cfg.remat != "none":
            # prevent_cse only matters outside scan; inside it just blocks XLA optimisations.
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat],
                                  prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x_BxTxD, _ = jax.lax.scan(body, x_BxTxD, stacked_state)
            return x_BxTxD
        for i in range(self.cfg.n_layers):
            x_BxTxD, _ = body(x_BxTxD, jax.tree.map(lambda a: a[i], stacked_state))
        return x_BxTxD


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Number of parameters, from shapes only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, vocab_size, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
