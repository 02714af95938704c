"""The decoder's layers: RMSNorm, rotary embedding, attention, MLP, and the block.

Job: one block of every supported family, its variant switches read from
`families.variant(cfg.family)` and its numbers from the config.

- Every nnx.Param carries logical axis names (`out_sharding` metadata, length == ndim);
  no mesh axis name appears here.
- Params are stored in `param_dtype`, matmuls run in `dtype`; norms, rotary tables,
  softmax and the logits are float32.
- Names follow Hugging Face (`q_proj`, `gate_proj`, ...; `q_bias` for Qwen2's
  `q_proj.bias`), so the checkpoint mapping in hf.py is a rename plus a reshape.
- Attention takes an `attend(q, k, v) -> (out, aux)` function: the packed training path
  and the KV-cache decode path differ only there.
- Every block projection y = x @ W passes through an optional `adapt(path, x, W, y)` hook
  before any bias or norm (LoRA/DoRA branches, lora.py); None leaves the projection as is.
  So does each branch's output before the residual add, at "attn/adapter" and "mlp/adapter"
  with W None (bottleneck adapters, bottleneck.py); LoRA's hook passes those through.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from jaxsft.config import ModelConfig, RopeScaling
from jaxsft.model.dense import dense
from jaxsft.model.families import variant

ACTIVATION_AXES = ("batch", "length", "embed")
_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gated(gate_BxTxF, up_BxTxF, activation: str):
    """act(gate) * up, differentiated from gate and up alone.

    Autodiff of the product kept act(gate), its derivative's factors and the product itself,
    six [B, T, F] arrays per layer between forward and backward; this keeps gate and up and
    recomputes the rest inside the backward's elementwise pass (bench/NOTES.md, round 7). The
    derivative is jax.vjp of the same function, so the numbers are autodiff's."""
    return _ACTIVATIONS[activation](gate_BxTxF) * up_BxTxF


def _gated_fwd(gate_BxTxF, up_BxTxF, activation):
    return gated(gate_BxTxF, up_BxTxF, activation), (gate_BxTxF, up_BxTxF)


def _gated_bwd(activation, residuals, d_hidden_BxTxF):
    gate_BxTxF, up_BxTxF = residuals
    act_BxTxF, act_vjp = jax.vjp(_ACTIVATIONS[activation], gate_BxTxF)
    return act_vjp(d_hidden_BxTxF * up_BxTxF)[0], d_hidden_BxTxF * act_BxTxF


gated.defvjp(_gated_fwd, _gated_bwd)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    # eager_sharding=False: flax 0.12 otherwise places every annotated variable on the
    # ambient mesh at creation, which fails with no mesh and cannot read logical names.
    # Placement is the trainer's job (jit with out_shardings from the logical specs).
    init = nnx.with_partitioning(init, names, eager_sharding=False)
    return nnx.Param(init(rngs.params(), shape, dtype))


def constrain(x, names: tuple[str, ...]):
    """Logical sharding hint; a no-op unless the caller activated axis rules and a mesh."""
    return nn.with_logical_constraint(x, names)


class RMSNorm(nnx.Module):
    """x / rms(x) * (offset + w): offset 0 for Llama, 1 for Gemma (whose w starts at 0)."""

    def __init__(self, dim: int, eps: float, param_dtype, offset: float = 0.0, names=("embed",), *, rngs: nnx.Rngs):
        self.eps, self.offset = eps, offset
        init = nnx.initializers.zeros if offset else nnx.initializers.ones
        self.scale = param(rngs, init, (dim,), names, param_dtype)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        return rms_norm(x_BxTxD, self.scale[...], self.eps, self.offset)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x_BxTxD, scale_D, eps: float, offset: float):
    """x / rms(x) * (offset + scale) over the last axis, statistics in float32 (a bfloat16 mean
    of squares loses the small components), the result in x's dtype.

    Differentiated by hand from x and the [B, T, 1] inverse rms: autodiff also kept the
    normalised x, an activation-sized array per norm between forward and backward."""
    return _rms_norm_fwd(x_BxTxD, scale_D, eps, offset)[0]


def _rms_norm_fwd(x_BxTxD, scale_D, eps, offset):
    x32_BxTxD = x_BxTxD.astype(jnp.float32)
    inv_rms_BxTx1 = jax.lax.rsqrt(jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True) + eps)
    y_BxTxD = (x32_BxTxD * inv_rms_BxTx1 * (offset + scale_D.astype(jnp.float32))).astype(x_BxTxD.dtype)
    return y_BxTxD, (x_BxTxD, scale_D, inv_rms_BxTx1)


def _rms_norm_bwd(eps, offset, residuals, d_y_BxTxD):
    """With n = x * r, r = (mean(x^2) + eps)^-1/2 and s = offset + scale:
    d_scale = sum over tokens of dy * n; dx = r * (dy*s - n * mean(dy*s * n))."""
    x_BxTxD, scale_D, inv_rms_BxTx1 = residuals
    normed_BxTxD = x_BxTxD.astype(jnp.float32) * inv_rms_BxTx1
    d_y_BxTxD32 = d_y_BxTxD.astype(jnp.float32)
    d_scale_D = jnp.sum(d_y_BxTxD32 * normed_BxTxD, axis=tuple(range(x_BxTxD.ndim - 1)))
    d_normed_BxTxD = d_y_BxTxD32 * (offset + scale_D.astype(jnp.float32))
    mean_BxTx1 = jnp.mean(d_normed_BxTxD * normed_BxTxD, axis=-1, keepdims=True)
    d_x_BxTxD = inv_rms_BxTx1 * (d_normed_BxTxD - normed_BxTxD * mean_BxTx1)
    return d_x_BxTxD.astype(x_BxTxD.dtype), d_scale_D.astype(scale_D.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()) -> np.ndarray:
    """Inverse frequencies (float32), with Llama 3.1's smooth long-wavelength scaling if asked."""
    inv_freq_A = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    if scaling.type != "llama3":
        return inv_freq_A.astype(np.float32)
    s = scaling
    low_wavelen, high_wavelen = (
        s.original_max_position / s.low_freq_factor,
        s.original_max_position / s.high_freq_factor,
    )
    wavelen_A = 2 * math.pi / inv_freq_A
    scaled_A = np.where(wavelen_A > low_wavelen, inv_freq_A / s.factor, inv_freq_A)
    smooth_A = (s.original_max_position / wavelen_A - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed_A = (1 - smooth_A) * scaled_A / s.factor + smooth_A * scaled_A
    medium_A = (wavelen_A >= high_wavelen) & (wavelen_A <= low_wavelen)
    return np.where(medium_A, smoothed_A, scaled_A).astype(np.float32)


def rope_tables(
    positions_BxT: jax.Array, head_dim: int, theta: float, scaling: RopeScaling = RopeScaling()
) -> tuple[jax.Array, jax.Array]:
    """cos/sin of the rotary angles, float32, in the rotate_half layout (halves repeated)."""
    inv_freq_A = jnp.asarray(rope_frequencies(head_dim, theta, scaling))
    angles_BxTxA = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_A
    angles_BxTxH = jnp.concatenate([angles_BxTxA, angles_BxTxA], axis=-1)
    return jnp.cos(angles_BxTxH), jnp.sin(angles_BxTxH)


def _rotate(x_BxTxNxH, cos_BxTxH, sin_BxTxH):
    """x * cos + rotate_half(x) * sin on halves, float32 inside, x's dtype out."""
    half = x_BxTxNxH.shape[-1] // 2
    first, second = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    cos_BxTx1xA, sin_BxTx1xA = cos_BxTxH[:, :, None, :half], sin_BxTxH[:, :, None, :half]
    out = jnp.concatenate([first * cos_BxTx1xA - second * sin_BxTx1xA, second * cos_BxTx1xA + first * sin_BxTx1xA], -1)
    return out.astype(x_BxTxNxH.dtype)


@jax.custom_vjp
def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """Llama/HF `rotate_half`: pairs are (i, i + H/2), not interleaved (i, i + 1).

    A rotation, so its gradient is the rotation back (sin negated): one fused pass, where
    autodiff of the concatenate took pads and a second concatenate (bench/NOTES.md)."""
    return _rotate(x_BxTxNxH, cos_BxTxH, sin_BxTxH)


apply_rope.defvjp(
    lambda x, cos, sin: (_rotate(x, cos, sin), (cos, sin)),
    lambda residuals, d_out: (_rotate(d_out, residuals[0], -residuals[1]), None, None),
)


def _linear(x, w, n_in: int, dtype, adapt, path: str):
    """x's last `n_in` axes times w's first `n_in` (model/dense.py) in the compute dtype, then
    the adapter hook (if any) for the kernel at `path`."""
    y = dense(x, w.astype(dtype), n_in)
    return adapt(path, x, w, y) if adapt else y


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h, pdt = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
        var = variant(cfg.family)
        init = nnx.initializers.normal(cfg.init_std)
        # Residual-branch outputs scaled down so the residual stream's variance does not
        # grow with depth (GPT-2 / nanodo init); irrelevant once HF weights are loaded.
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.q_proj = param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), pdt)
        self.k_proj = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        self.v_proj = param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt)
        self.o_proj = param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), pdt)
        if var.qkv_bias:
            zeros = nnx.initializers.zeros
            self.q_bias = param(rngs, zeros, (n, h), ("heads", "head_dim"), pdt)
            self.k_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pdt)
            self.v_bias = param(rngs, zeros, (k, h), ("kv_heads", "head_dim"), pdt)
        if var.qk_norm:
            self.q_norm = RMSNorm(h, cfg.norm_eps, pdt, names=("head_dim",), rngs=rngs)
            self.k_norm = RMSNorm(h, cfg.norm_eps, pdt, names=("head_dim",), rngs=rngs)
        self.qkv_bias, self.qk_norm = var.qkv_bias, var.qk_norm
        self.dtype = jnp.dtype(cfg.dtype)

    def _project(self, x_BxTxD, name: str, adapt):
        dt = self.dtype
        y_BxTxNxH = _linear(x_BxTxD, getattr(self, f"{name}_proj")[...], 1, dt, adapt, f"attn/{name}_proj")
        if self.qkv_bias:
            y_BxTxNxH = y_BxTxNxH + getattr(self, f"{name}_bias")[...].astype(dt)
        if self.qk_norm and name in ("q", "k"):
            y_BxTxNxH = getattr(self, f"{name}_norm")(y_BxTxNxH)
        return y_BxTxNxH

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, attend, adapt=None):
        q_BxTxNxH = apply_rope(self._project(x_BxTxD, "q", adapt), cos_BxTxH, sin_BxTxH)
        k_BxTxKxH = apply_rope(self._project(x_BxTxD, "k", adapt), cos_BxTxH, sin_BxTxH)
        q_BxTxNxH = constrain(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        k_BxTxKxH = constrain(k_BxTxKxH, ("batch", "length", "kv_heads", "head_dim"))
        v_BxTxKxH = constrain(self._project(x_BxTxD, "v", adapt), ("batch", "length", "kv_heads", "head_dim"))
        out_BxTxNxH, aux = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
        return _linear(out_BxTxNxH, self.o_proj[...], 2, self.dtype, adapt, "attn/o_proj"), aux


class MLP(nnx.Module):
    """Gated: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (tanh gelu, Gemma)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f, pdt = cfg.d_model, cfg.d_ff, cfg.param_dtype
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layers))
        self.gate_proj = param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.up_proj = param(rngs, init, (d, f), ("embed", "mlp"), pdt)
        self.down_proj = param(rngs, out_init, (f, d), ("mlp", "embed"), pdt)
        self.activation = variant(cfg.family).activation
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x_BxTxD, adapt=None):
        dt = self.dtype
        gate_BxTxF = _linear(x_BxTxD, self.gate_proj[...], 1, dt, adapt, "mlp/gate_proj")
        up_BxTxF = _linear(x_BxTxD, self.up_proj[...], 1, dt, adapt, "mlp/up_proj")
        hidden_BxTxF = constrain(gated(gate_BxTxF, up_BxTxF, self.activation), ("batch", "length", "mlp"))
        return _linear(hidden_BxTxF, self.down_proj[...], 1, dt, adapt, "mlp/down_proj")


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)).

    Gemma 2 also normalises each branch's output before adding it (`post_norms`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        var = variant(cfg.family)
        norm = lambda: RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, var.norm_offset, rngs=rngs)
        self.attn_norm = norm()
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg, rngs=rngs)
        if var.post_norms:
            self.post_attn_norm = norm()
            self.post_mlp_norm = norm()
        self.post_norms = var.post_norms

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, attend, adapt=None):
        h_BxTxD, aux = self.attn(self.attn_norm(x_BxTxD), cos_BxTxH, sin_BxTxH, attend, adapt)
        if self.post_norms:
            h_BxTxD = self.post_attn_norm(h_BxTxD)
        if adapt:  # a branch's output before the residual add (bottleneck adapters)
            h_BxTxD = adapt("attn/adapter", h_BxTxD, None, h_BxTxD)
        x_BxTxD = x_BxTxD + h_BxTxD
        h_BxTxD = self.mlp(self.mlp_norm(x_BxTxD), adapt)
        if self.post_norms:
            h_BxTxD = self.post_mlp_norm(h_BxTxD)
        if adapt:
            h_BxTxD = adapt("mlp/adapter", h_BxTxD, None, h_BxTxD)
        return constrain(x_BxTxD + h_BxTxD, ACTIVATION_AXES), aux
