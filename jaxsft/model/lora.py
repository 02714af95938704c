"""LoRA and DoRA: low-rank adapters kept as their own pytree, added as a branch in the projections.

Design
------
- The adapters are a separate pure-dict pytree, shaped like the part of the model's
  params they adapt: `{"blocks": {"attn": {"q_proj": {"a": A, "b": B}}, ...}}` (DoRA adds
  the magnitude `"m"`). The base params never become trainable state: the train step
  differentiates with respect to the adapters only, so the base gets no weight gradient,
  no optimizer state, and comes out of training bit-identical.
- A kernel W of shape [L, *in, *out] (our layout: q/k/v [L, d, n, h], o [L, n, h, d],
  gate/up [L, d, f], down [L, f, d]) gets A [L, *in, r] and B [L, r, *out] (and DoRA's m
  [L, *out]), so A carries the kernel's input logical axes and B (and m) its output axes:
  adapters shard with the base they adapt through the same logical->mesh rules.
- In the model each adapted projection computes y = x W + s (drop(x) A) B, with s =
  alpha/r (alpha/sqrt(r) with rslora): the frozen W only takes part in matmuls with
  activations, so the backward pass never forms a full-size weight gradient. The hook
  (`layer_hook`) is handed to the block by the layer scan, one layer's adapters at a time.
- DoRA (Liu et al. 2024, as Hugging Face PEFT computes it): W' = m * V / ||V||, V = W + s A B,
  the norm per output feature over the input axes and detached from the gradient. With
  dropout PEFT applies the magnitude to W's output of the dropped input; so do we.
  m starts at ||W||, so a fresh DoRA model is exactly the base too.
- A is random (PEFT's kaiming-uniform bound 1/sqrt(fan_in)), B is zero: the adapted
  model starts exactly at the base. `merge` writes W' (export, generation).
- `targets` picks kernels by short name (q k v o gate up down), `all-linear` (all seven),
  or a regular expression searched in the param path ("blocks/attn/q_proj"); only the
  seven block projections can be adapted (embedding and head stay frozen).

Modules: the kernel table, `target_paths`, `scale` and the in-scan branch (`layer_hook`)
live in lora_branch.py, below the decoder that runs them; the Hugging Face PEFT files
(adapter_config.json + adapter_model.safetensors) in hf_peft.py.

Contract:
    target_paths(cfg) -> tuple of param paths;  scale(cfg) -> float   (from lora_branch.py)
    adapter_shapes(params, cfg) -> {path: {"a": shape, "b": shape[, "m": shape]}} (params may be abstract,
        or a QLoRA base whose kernels are quantised: quant.py)
    adapter_specs(specs, params, cfg) -> logical names tree for the adapters
    init_adapters(params, cfg, key) -> adapters;  merge(params, adapters, cfg) -> params
    count(model_cfg, vocab_size, cfg) -> (trainable, total), without allocating anything
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxsft.config import ModelConfig, PeftConfig
from jaxsft.model import paths, quant
from jaxsft.model.lora_branch import KERNELS, scale, target_paths
from jaxsft.model.transformer import abstract_params

__all__ = [
    "KERNELS",
    "target_paths",
    "scale",
    "adapter_shapes",
    "adapter_specs",
    "init_adapters",
    "delta",
    "merge",
    "count",
]
_IN_DIMS = dict(KERNELS.values())  # param path -> number of input dims after the 'layers' axis


def adapter_shapes(params, cfg: PeftConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{path: {"a": [L, *in, r], "b": [L, r, *out], DoRA "m": [L, *out]}} for every adapted kernel."""
    out = {}
    for path in target_paths(cfg):
        shape = quant.kernel_shape(paths.get(params, path), path)  # a QLoRA base's too
        split = 1 + _IN_DIMS[path]
        out[path] = {"a": (*shape[:split], cfg.rank), "b": (shape[0], cfg.rank, *shape[split:])}
        if cfg.method == "dora":
            out[path]["m"] = (shape[0], *shape[split:])
    return out


def adapter_specs(specs, params, cfg: PeftConfig) -> dict:
    """Logical sharding of the adapters: A takes W's input axes, B and m its output axes (rank unsharded)."""
    tree = {}
    for path in target_paths(cfg):
        kind = type(paths.get(specs, path))
        spec = tuple(paths.get(specs, path))
        split = 1 + _IN_DIMS[path]
        spec = spec + (None,) * (len(paths.get(params, path).shape) - len(spec))
        node = {"a": kind(*spec[:split], None), "b": kind(spec[0], None, *spec[split:])}
        if cfg.method == "dora":
            node["m"] = kind(spec[0], *spec[split:])
        paths.put(tree, path, node)
    return tree


def _column_norm(w, n_in: int) -> jax.Array:
    """||W|| per output feature: the L2 norm over the input axes of [L, *in, *out], float32.

    A quantised kernel (QLoRA) is dequantised one layer at a time, never whole."""
    if quant.quantized(w):
        return jax.lax.map(lambda layer: _column_norm(quant.dequantize(layer, tuple(range(n_in)))[None], n_in)[0], w)
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(1, 1 + n_in))))


def init_adapters(params, cfg: PeftConfig, key: jax.Array) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default), B = 0, DoRA m = ||W||; float32."""
    tree = {}
    shapes = adapter_shapes(params, cfg)
    for k, (path, shape) in zip(jax.random.split(key, len(shapes)), shapes.items()):
        bound = 1.0 / math.sqrt(math.prod(shape["a"][1:-1]))
        node = {
            "a": jax.random.uniform(k, shape["a"], jnp.float32, -bound, bound),
            "b": jnp.zeros(shape["b"], jnp.float32),
        }
        if "m" in shape:
            node["m"] = _column_norm(paths.get(params, path), _IN_DIMS[path])
        paths.put(tree, path, node)
    return tree


def delta(adapter: dict, cfg: PeftConfig) -> jax.Array:
    """s * A @ B reshaped to the kernel's [L, *in, *out], float32."""
    a, b = adapter["a"], adapter["b"]
    layers, rank = a.shape[0], a.shape[-1]
    a_LxIxR = a.reshape(layers, -1, rank).astype(jnp.float32)
    b_LxRxO = b.reshape(layers, rank, -1).astype(jnp.float32)
    d_LxIxO = jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO, preferred_element_type=jnp.float32)
    return (scale(cfg) * d_LxIxO).reshape(*a.shape[:-1], *b.shape[2:])


def merge(params: dict, adapters: dict, cfg: PeftConfig, dtype=None) -> dict:
    """params with every adapted kernel replaced by W + s A B (DoRA: m * V / ||V||), float32 unless `dtype`."""
    merged = jax.tree.map(lambda x: x, params)  # a new dict tree; leaves are shared
    for path in target_paths(cfg):
        adapter = paths.get(adapters, path)
        new = paths.get(params, path).astype(jnp.float32) + delta(adapter, cfg)
        if "m" in adapter:
            n_in = _IN_DIMS[path]
            ratio = adapter["m"].astype(jnp.float32) / _column_norm(new, n_in)
            new = new * ratio.reshape(ratio.shape[0], *(1,) * n_in, *ratio.shape[1:])
        paths.put(merged, path, new.astype(dtype) if dtype else new)
    return merged


def count(model_cfg: ModelConfig, vocab_size: int, cfg: PeftConfig) -> tuple[int, int]:
    """(trainable adapter params, base + adapter params) as PEFT prints them, from shapes only."""
    params = abstract_params(model_cfg, vocab_size)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    trainable = sum(math.prod(shape) for node in adapter_shapes(params, cfg).values() for shape in node.values())
    return trainable, total + trainable
