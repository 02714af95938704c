"""LoRA: low-rank adapters kept as their own pytree, merged into the frozen base per step.

Design
------
- The adapters are a separate pure-dict pytree, shaped like the part of the model's
  params they adapt: `{"blocks": {"attn": {"q_proj": {"a": A, "b": B}}, ...}}`. The
  base params never become trainable state: the train step differentiates a loss of
  `(adapters, base)` with respect to the adapters only, so the base gets no gradient
  buffers and no optimizer state, and comes out of training bit-identical.
- A kernel W of shape [L, *in, *out] (our layout: q/k/v [L, d, n, h], o [L, n, h, d],
  gate/up [L, d, f], down [L, f, d]) gets A [L, *in, r] and B [L, r, *out], so A carries
  the kernel's input logical axes and B its output axes: adapters shard with the base
  they adapt through the same logical->mesh rules (no mesh names here).
- `merge` computes W' = W + s * A @ B (s = alpha/r, or alpha/sqrt(r) with rslora) in
  float32; the base may be stored in bf16 while the adapters are float32. In training
  the model calls `merge_layer` inside its layer scan, so only one layer's merged
  kernels (and their gradients) exist at a time. A is random (PEFT's kaiming-uniform
  bound 1/sqrt(fan_in)), B is zero, so the adapted model starts exactly at the base.
  `merge` is also how an adapted run is exported as full weights.
- This is subtle because the merge is a weight rewrite, not an extra x @ A @ B branch:
  the backward pass forms dL/dW' per adapted kernel (one matmul as large as the base
  weight gradient) before projecting onto A and B. It leaves the layers untouched and
  the math exact; the price is those FLOPs and that input dropout on the adapter path
  is impossible, so `lora.dropout` must be 0.
- `targets` picks kernels by short name (q k v o gate up down), `all-linear` (all seven),
  or a regular expression searched in the param path ("blocks/attn/q_proj"); only the
  seven block projections can be adapted (embedding and head stay frozen).

Contract:
    target_paths(cfg) -> tuple of param paths;  scale(cfg) -> float
    adapter_shapes(params, cfg) -> {path: (A shape, B shape)} (params may be abstract)
    adapter_specs(specs, params, cfg) -> PartitionSpec-like logical names tree for the adapters
    init_adapters(params, cfg, key) -> adapters;  merge(params, adapters, cfg) -> params
    merge_layer(layer_params, layer_adapters, cfg) -> layer params (inside the model's layer scan)
    count(model_cfg, vocab_size, cfg) -> (trainable, total), without allocating anything
    save_peft(adapters, cfg, out_dir, base_model) -> files (adapter_config.json + adapter_model.safetensors)
    load_peft(adapter_dir, params) -> (LoraConfig, adapters)   a HF PEFT LoRA adapter, read back
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import ConfigError, LoraConfig
from jaxsft.model.safetensors_io import TensorSpec, _write_file

# short name -> (param path, number of input dims after the 'layers' axis)
KERNELS = {
    "q": ("blocks/attn/q_proj", 1), "k": ("blocks/attn/k_proj", 1), "v": ("blocks/attn/v_proj", 1),
    "o": ("blocks/attn/o_proj", 2),
    "gate": ("blocks/mlp/gate_proj", 1), "up": ("blocks/mlp/up_proj", 1), "down": ("blocks/mlp/down_proj", 1),
}
_IN_DIMS = dict(KERNELS.values())


def target_paths(cfg: LoraConfig) -> tuple[str, ...]:
    paths = []
    for target in cfg.targets:
        if target == "all-linear":
            found = [p for p, _ in KERNELS.values()]
        elif target in KERNELS:
            found = [KERNELS[target][0]]
        else:
            try:
                pattern = re.compile(target)
            except re.error as e:
                raise ConfigError(f"lora.targets: {target!r} is neither a kernel name nor a valid regex ({e})") from None
            found = [p for p, _ in KERNELS.values() if pattern.search(p)]
            if not found:
                raise ConfigError(f"lora.targets: {target!r} matches none of {', '.join(_IN_DIMS)}")
        paths += [p for p in found if p not in paths]
    return tuple(paths)


def scale(cfg: LoraConfig) -> float:
    return cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)


def _get(tree, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict, path: str, value) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


def adapter_shapes(params, cfg: LoraConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{path: (A shape [L, *in, r], B shape [L, r, *out])} for every adapted kernel."""
    out = {}
    for path in target_paths(cfg):
        shape = tuple(_get(params, path).shape)
        split = 1 + _IN_DIMS[path]
        out[path] = ((*shape[:split], cfg.rank), (shape[0], cfg.rank, *shape[split:]))
    return out


def adapter_specs(specs, params, cfg: LoraConfig) -> dict:
    """Logical sharding of the adapters: A takes W's input axes, B its output axes (rank unsharded)."""
    tree = {}
    for path in target_paths(cfg):
        spec = tuple(_get(specs, path))
        split = 1 + _IN_DIMS[path]
        spec = spec + (None,) * (len(_get(params, path).shape) - len(spec))
        _set(tree, path, {"a": type(_get(specs, path))(*spec[:split], None),
                          "b": type(_get(specs, path))(spec[0], None, *spec[split:])})
    return tree


def init_adapters(params, cfg: LoraConfig, key: jax.Array) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default), B = 0; float32."""
    tree = {}
    shapes = adapter_shapes(params, cfg)
    for k, (path, (a_shape, b_shape)) in zip(jax.random.split(key, len(shapes)), shapes.items()):
        bound = 1.0 / math.sqrt(math.prod(a_shape[1:-1]))
        _set(tree, path, {"a": jax.random.uniform(k, a_shape, jnp.float32, -bound, bound),
                          "b": jnp.zeros(b_shape, jnp.float32)})
    return tree


def delta(adapter: dict, cfg: LoraConfig) -> jax.Array:
    """s * A @ B reshaped to the kernel's [L, *in, *out], float32."""
    a, b = adapter["a"], adapter["b"]
    layers, rank = a.shape[0], a.shape[-1]
    a_LxIxR = a.reshape(layers, -1, rank).astype(jnp.float32)
    b_LxRxO = b.reshape(layers, rank, -1).astype(jnp.float32)
    d_LxIxO = jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO, preferred_element_type=jnp.float32)
    return (scale(cfg) * d_LxIxO).reshape(*a.shape[:-1], *b.shape[2:])


def merge(params: dict, adapters: dict, cfg: LoraConfig, dtype=None) -> dict:
    """params with every adapted kernel replaced by W + s * A @ B (float32 unless `dtype`)."""
    merged = jax.tree.map(lambda x: x, params)  # a new dict tree; leaves are shared
    for path in target_paths(cfg):
        w = _get(params, path)
        new = w.astype(jnp.float32) + delta(_get(adapters, path), cfg)
        _set(merged, path, new.astype(dtype) if dtype else new)
    return merged


def merge_layer(layer_params: dict, layer_adapters: dict, cfg: LoraConfig) -> dict:
    """`merge` for one block's params (no 'layers' axis; adapters as `adapters["blocks"]` sliced)."""
    add_axis = lambda tree: {"blocks": jax.tree.map(lambda x: x[None], tree)}
    merged = merge(add_axis(layer_params), add_axis(layer_adapters), cfg)["blocks"]
    return jax.tree.map(lambda x: x[0], merged)


def count(model_cfg, vocab_size: int, cfg: LoraConfig) -> tuple[int, int]:
    """(trainable adapter params, base + adapter params) as PEFT prints them, from shapes only."""
    from jaxsft.model.hf import abstract_params
    from flax import traverse_util

    flat = abstract_params(model_cfg, vocab_size)
    total = sum(math.prod(x.shape) for x in flat.values())
    params = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
    trainable = sum(math.prod(a) + math.prod(b) for a, b in adapter_shapes(params, cfg).values())
    return trainable, total + trainable


# ---------------------------------------------------------------- Hugging Face PEFT

_HF_MODULES = {"blocks/attn/q_proj": "self_attn.q_proj", "blocks/attn/k_proj": "self_attn.k_proj",
               "blocks/attn/v_proj": "self_attn.v_proj", "blocks/attn/o_proj": "self_attn.o_proj",
               "blocks/mlp/gate_proj": "mlp.gate_proj", "blocks/mlp/up_proj": "mlp.up_proj",
               "blocks/mlp/down_proj": "mlp.down_proj"}
_PEFT_NAME = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"


def peft_tensors(adapters: dict, cfg: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors: lora_A [r, in] and lora_B [out, r] per layer, in HF's flattened head order."""
    out = {}
    for path in target_paths(cfg):
        adapter = _get(adapters, path)
        a, b = np.asarray(jax.device_get(adapter["a"])), np.asarray(jax.device_get(adapter["b"]))
        layers, rank = a.shape[0], cfg.rank
        for i in range(layers):
            out[_PEFT_NAME.format(i=i, module=_HF_MODULES[path], ab="A")] = a[i].reshape(-1, rank).T
            out[_PEFT_NAME.format(i=i, module=_HF_MODULES[path], ab="B")] = b[i].reshape(rank, -1).T
    return out


def peft_config(cfg: LoraConfig, base_model: str = "") -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "base_model_name_or_path": base_model,
            "target_modules": sorted(_HF_MODULES[p].split(".")[-1] for p in target_paths(cfg))}


def save_peft(adapters: dict, cfg: LoraConfig, out_dir: str | Path, base_model: str = "") -> list[str]:
    """Writes adapter_config.json + adapter_model.safetensors (float32), loadable by `peft.PeftModel`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in peft_tensors(adapters, cfg).items()}
    specs = [TensorSpec(name, t.shape, np.dtype(np.float32)) for name, t in tensors.items()]
    _write_file(out_dir / "adapter_model.safetensors", specs, tensors.__getitem__)
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    return ["adapter_config.json", "adapter_model.safetensors"]


def load_peft(adapter_dir: str | Path, params) -> tuple[LoraConfig, dict]:
    """A HF PEFT LoRA adapter directory as (LoraConfig, adapters) for `params` (shapes only are read)."""
    from jaxsft.model.safetensors_io import TensorIndex

    adapter_dir = Path(adapter_dir)
    peft = json.loads((adapter_dir / "adapter_config.json").read_text())
    if peft.get("peft_type") != "LORA" or peft.get("use_dora") or peft.get("fan_in_fan_out"):
        raise ConfigError(f"{adapter_dir}: only plain LoRA adapters are read (got peft_type={peft.get('peft_type')}, "
                          f"use_dora={peft.get('use_dora')}, fan_in_fan_out={peft.get('fan_in_fan_out')})")
    modules = peft["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    by_module = {_HF_MODULES[path].split(".")[-1]: short for short, (path, _) in KERNELS.items()}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConfigError(f"{adapter_dir}: target_modules {unknown} are not adaptable (expected {sorted(by_module)})")
    cfg = LoraConfig(enabled=True, rank=int(peft["r"]), alpha=float(peft["lora_alpha"]),
                     rslora=bool(peft.get("use_rslora", False)), targets=tuple(by_module[m] for m in modules))
    index, tree = TensorIndex(adapter_dir), {}
    for path, (a_shape, b_shape) in adapter_shapes(params, cfg).items():
        name = lambda i, ab: _PEFT_NAME.format(i=i, module=_HF_MODULES[path], ab=ab)
        a = np.stack([index.read(name(i, "A")).T.reshape(a_shape[1:]) for i in range(a_shape[0])])
        b = np.stack([index.read(name(i, "B")).T.reshape(b_shape[1:]) for i in range(b_shape[0])])
        _set(tree, path, {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)})
    return cfg, tree
