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

Contract:
    target_paths(cfg) -> tuple of param paths;  scale(cfg) -> float
    adapter_shapes(params, cfg) -> {path: {"a": shape, "b": shape[, "m": shape]}} (params may be abstract)
    adapter_specs(specs, params, cfg) -> logical names tree for the adapters
    init_adapters(params, cfg, key) -> adapters;  merge(params, adapters, cfg) -> params
    layer_hook(layer_adapters, cfg, key) -> adapt(path, x, w, y) -> y   (inside the layer scan)
    count(model_cfg, vocab_size, cfg) -> (trainable, total), without allocating anything
    save_peft(adapters, cfg, out_dir, base_model) -> files (adapter_config.json + adapter_model.safetensors)
    load_peft(adapter_dir, params) -> (PeftConfig, adapters)   a HF PEFT LoRA/DoRA adapter, read back
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import ConfigError, PeftConfig
from jaxsft.model.safetensors_io import TensorSpec, _write_file

# short name -> (param path, number of input dims after the 'layers' axis)
KERNELS = {
    "q": ("blocks/attn/q_proj", 1), "k": ("blocks/attn/k_proj", 1), "v": ("blocks/attn/v_proj", 1),
    "o": ("blocks/attn/o_proj", 2),
    "gate": ("blocks/mlp/gate_proj", 1), "up": ("blocks/mlp/up_proj", 1), "down": ("blocks/mlp/down_proj", 1),
}
_IN_DIMS = dict(KERNELS.values())


def target_paths(cfg: PeftConfig) -> tuple[str, ...]:
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
                raise ConfigError(f"model.peft.targets: {target!r} is neither a kernel name nor a valid regex ({e})") from None
            found = [p for p, _ in KERNELS.values() if pattern.search(p)]
            if not found:
                raise ConfigError(f"model.peft.targets: {target!r} matches none of {', '.join(_IN_DIMS)}")
        paths += [p for p in found if p not in paths]
    return tuple(paths)


def scale(cfg: PeftConfig) -> float:
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


def adapter_shapes(params, cfg: PeftConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """{path: {"a": [L, *in, r], "b": [L, r, *out], DoRA "m": [L, *out]}} for every adapted kernel."""
    out = {}
    for path in target_paths(cfg):
        shape = tuple(_get(params, path).shape)
        split = 1 + _IN_DIMS[path]
        out[path] = {"a": (*shape[:split], cfg.rank), "b": (shape[0], cfg.rank, *shape[split:])}
        if cfg.method == "dora":
            out[path]["m"] = (shape[0], *shape[split:])
    return out


def adapter_specs(specs, params, cfg: PeftConfig) -> dict:
    """Logical sharding of the adapters: A takes W's input axes, B and m its output axes (rank unsharded)."""
    tree = {}
    for path in target_paths(cfg):
        kind = type(_get(specs, path))
        spec = tuple(_get(specs, path))
        split = 1 + _IN_DIMS[path]
        spec = spec + (None,) * (len(_get(params, path).shape) - len(spec))
        node = {"a": kind(*spec[:split], None), "b": kind(spec[0], None, *spec[split:])}
        if cfg.method == "dora":
            node["m"] = kind(spec[0], *spec[split:])
        _set(tree, path, node)
    return tree


def _column_norm(w, n_in: int) -> jax.Array:
    """||W|| per output feature: the L2 norm over the input axes of [L, *in, *out], float32."""
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=tuple(range(1, 1 + n_in))))


def init_adapters(params, cfg: PeftConfig, key: jax.Array) -> dict:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's default), B = 0, DoRA m = ||W||; float32."""
    tree = {}
    shapes = adapter_shapes(params, cfg)
    for k, (path, shape) in zip(jax.random.split(key, len(shapes)), shapes.items()):
        bound = 1.0 / math.sqrt(math.prod(shape["a"][1:-1]))
        node = {"a": jax.random.uniform(k, shape["a"], jnp.float32, -bound, bound),
                "b": jnp.zeros(shape["b"], jnp.float32)}
        if "m" in shape:
            node["m"] = _column_norm(_get(params, path), _IN_DIMS[path])
        _set(tree, path, node)
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
        adapter = _get(adapters, path)
        new = _get(params, path).astype(jnp.float32) + delta(adapter, cfg)
        if "m" in adapter:
            n_in = _IN_DIMS[path]
            ratio = adapter["m"].astype(jnp.float32) / _column_norm(new, n_in)
            new = new * ratio.reshape(ratio.shape[0], *(1,) * n_in, *ratio.shape[1:])
        _set(merged, path, new.astype(dtype) if dtype else new)
    return merged


_KERNEL_IDS = {path.removeprefix("blocks/"): i for i, (path, _) in enumerate(KERNELS.values())}


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
        v = w.astype(jnp.float32) + s * jnp.tensordot(jax.lax.stop_gradient(node["a"]).astype(jnp.float32),
                                                      jax.lax.stop_gradient(node["b"]).astype(jnp.float32),
                                                      axes=([n_in], [0]))
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(n_in)))))
        ratio = (node["m"].astype(jnp.float32) / norm).astype(dt)
        base = y if dropped is x else jnp.tensordot(dropped, w.astype(dt), axes=(in_axes, tuple(range(n_in))))
        return y + (ratio - 1) * base + ratio * branch.astype(dt)

    return adapt


def count(model_cfg, vocab_size: int, cfg: PeftConfig) -> tuple[int, int]:
    """(trainable adapter params, base + adapter params) as PEFT prints them, from shapes only."""
    from jaxsft.model.hf import abstract_params
    from flax import traverse_util

    flat = abstract_params(model_cfg, vocab_size)
    total = sum(math.prod(x.shape) for x in flat.values())
    params = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
    trainable = sum(math.prod(shape) for node in adapter_shapes(params, cfg).values() for shape in node.values())
    return trainable, total + trainable


# ---------------------------------------------------------------- Hugging Face PEFT

_HF_MODULES = {"blocks/attn/q_proj": "self_attn.q_proj", "blocks/attn/k_proj": "self_attn.k_proj",
               "blocks/attn/v_proj": "self_attn.v_proj", "blocks/attn/o_proj": "self_attn.o_proj",
               "blocks/mlp/gate_proj": "mlp.gate_proj", "blocks/mlp/up_proj": "mlp.up_proj",
               "blocks/mlp/down_proj": "mlp.down_proj"}
_PEFT_NAME = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"
_PEFT_MAGNITUDE = "base_model.model.model.layers.{i}.{module}.lora_magnitude_vector"


def _peft_name(path: str, i: int, key: str) -> str:
    module = _HF_MODULES[path]
    return _PEFT_MAGNITUDE.format(i=i, module=module) if key == "m" else _PEFT_NAME.format(
        i=i, module=module, ab=key.upper())


def _to_peft(key: str, x: np.ndarray, rank: int) -> np.ndarray:
    """One layer's A [*in, r] -> lora_A [r, in]; B [r, *out] -> lora_B [out, r]; m [*out] -> [out]."""
    return {"a": lambda: x.reshape(-1, rank).T, "b": lambda: x.reshape(rank, -1).T, "m": lambda: x.reshape(-1)}[key]()


def peft_tensors(adapters: dict, cfg: PeftConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors per layer, in HF's flattened head order."""
    out = {}
    for path in target_paths(cfg):
        for key, x in _get(adapters, path).items():
            x = np.asarray(jax.device_get(x))
            for i in range(x.shape[0]):
                out[_peft_name(path, i, key)] = _to_peft(key, x[i], cfg.rank)
    return out


def peft_config(cfg: PeftConfig, base_model: str = "") -> dict:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
            "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora, "use_dora": cfg.method == "dora",
            "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model,
            "target_modules": sorted(_HF_MODULES[p].split(".")[-1] for p in target_paths(cfg))}


def save_peft(adapters: dict, cfg: PeftConfig, out_dir: str | Path, base_model: str = "") -> list[str]:
    """Writes adapter_config.json + adapter_model.safetensors (float32), loadable by `peft.PeftModel`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in peft_tensors(adapters, cfg).items()}
    specs = [TensorSpec(name, t.shape, np.dtype(np.float32)) for name, t in tensors.items()]
    _write_file(out_dir / "adapter_model.safetensors", specs, tensors.__getitem__)
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    return ["adapter_config.json", "adapter_model.safetensors"]


def load_peft(adapter_dir: str | Path, params) -> tuple[PeftConfig, dict]:
    """A HF PEFT LoRA or DoRA adapter directory as (PeftConfig, adapters) for `params` (shapes only are read)."""
    from jaxsft.model.safetensors_io import TensorIndex

    adapter_dir = Path(adapter_dir)
    try:
        peft = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{adapter_dir}: no readable adapter_config.json ({e})") from None
    if peft.get("peft_type") != "LORA" or peft.get("fan_in_fan_out"):
        raise ConfigError(f"{adapter_dir}: only LoRA/DoRA adapters are read (got peft_type={peft.get('peft_type')}, "
                          f"fan_in_fan_out={peft.get('fan_in_fan_out')})")
    modules = peft["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    by_module = {_HF_MODULES[path].split(".")[-1]: short for short, (path, _) in KERNELS.items()}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConfigError(f"{adapter_dir}: target_modules {unknown} are not adaptable (expected {sorted(by_module)})")
    cfg = PeftConfig(method="dora" if peft.get("use_dora") else "lora", rank=int(peft["r"]),
                     alpha=float(peft["lora_alpha"]), rslora=bool(peft.get("use_rslora", False)),
                     targets=tuple(by_module[m] for m in modules))
    index, tree = TensorIndex(adapter_dir), {}
    for path, shapes in adapter_shapes(params, cfg).items():
        node = {}
        for key, shape in shapes.items():
            layers = [index.read(_peft_name(path, i, key)) for i in range(shape[0])]
            layers = [x if key == "m" else x.T for x in layers]
            node[key] = jnp.asarray(np.stack([x.reshape(shape[1:]) for x in layers]), jnp.float32)
        _set(tree, path, node)
    return cfg, tree
