"""LoRA/DoRA as the model computes it: which kernels are adapted, and the branch they add.

The design is written once, in lora.py. This module is the part the decoder itself runs
(the layer scan builds one `layer_hook` per layer), kept apart so that transformer.py
depends on it while lora.py, which sizes adapters from the model, depends on transformer.py.

Contract:
    KERNELS: short name -> (param path, number of input dims after the 'layers' axis)
    target_paths(cfg) -> tuple of param paths;  scale(cfg) -> float
    layer_hook(layer_adapters, cfg, key) -> adapt(path, x, w, y) -> y   (inside the layer scan)
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from jaxsft.config import ConfigError, PeftConfig

KERNELS = {
    "q": ("blocks/attn/q_proj", 1),
    "k": ("blocks/attn/k_proj", 1),
    "v": ("blocks/attn/v_proj", 1),
    "o": ("blocks/attn/o_proj", 2),
    "gate": ("blocks/mlp/gate_proj", 1),
    "up": ("blocks/mlp/up_proj", 1),
    "down": ("blocks/mlp/down_proj", 1),
}
_PATHS = [path for path, _ in KERNELS.values()]


def target_paths(cfg: PeftConfig) -> tuple[str, ...]:
    paths = []
    for target in cfg.targets:
        if target == "all-linear":
            found = list(_PATHS)
        elif target in KERNELS:
            found = [KERNELS[target][0]]
        else:
            try:
                pattern = re.compile(target)
            except re.error as e:
                raise ConfigError(
                    f"model.peft.targets: {target!r} is neither a kernel name nor a valid regex ({e})"
                ) from None
            found = [p for p in _PATHS if pattern.search(p)]
            if not found:
                raise ConfigError(f"model.peft.targets: {target!r} matches none of {', '.join(_PATHS)}")
        paths += [p for p in found if p not in paths]
    return tuple(paths)


def scale(cfg: PeftConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


_KERNEL_IDS = {path.removeprefix("blocks/"): i for i, path in enumerate(_PATHS)}


def layer_hook(layer_adapters: dict | None, cfg: PeftConfig, key: jax.Array | None = None):
    """`adapt(path, x, w, y)` for one block: y = x @ w (+ nothing else yet) -> y with the adapter branch.

    `layer_adapters` are one layer's adapters (`adapters["blocks"]` sliced by the scan),
    `path` the kernel's path inside the block ("attn/q_proj"), x [B, T, *in], w [*in, *out].
    `key` (training with `dropout` > 0 only) drives the dropout on the branch's input.
    """
    if layer_adapters is None:
        return None
    s, rate = scale(cfg), cfg.dropout if key is not None else 0.0

    def adapt(path: str, x, w, y):
        group, name = path.split("/")
        node = layer_adapters.get(group, {}).get(name)
        if node is None:
            return y
        n_in, dt = x.ndim - 2, y.dtype
        dropped = x
        if rate:
            keep = jax.random.bernoulli(jax.random.fold_in(key, _KERNEL_IDS[path]), 1.0 - rate, x.shape)
            dropped = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
        in_axes = tuple(range(2, 2 + n_in))
        h_BxTxR = jnp.tensordot(dropped, node["a"].astype(dt), axes=(in_axes, tuple(range(n_in))))
        branch = s * jnp.tensordot(h_BxTxR, node["b"].astype(dt), axes=([2], [0]))
        if "m" not in node:
            return y + branch.astype(dt)
        # DoRA: the norm of the adapted kernel is a constant to the gradient (PEFT, DoRA section 4.3).
        v = w.astype(jnp.float32) + s * jnp.tensordot(
            jax.lax.stop_gradient(node["a"]).astype(jnp.float32),
            jax.lax.stop_gradient(node["b"]).astype(jnp.float32),
            axes=([n_in], [0]),
        )
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(n_in)))))
        ratio = (node["m"].astype(jnp.float32) / norm).astype(dt)
        base = y if dropped is x else jnp.tensordot(dropped, w.astype(dt), axes=(in_axes, tuple(range(n_in))))
        return y + (ratio - 1) * base + ratio * branch.astype(dt)

    return adapt
