"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2021): a small MLP inside each block.

Job: the params, shardings, counts, in-scan computation and files of `model.peft.method: adapter`.

Design
------
- An adapted branch (attention, MLP) of a block outputs h + up(act(h down + b_down)) + b_up
  instead of h, where h is the branch's output just before the residual add (after Gemma 2's
  post-norm): x + h becomes x + adapter(h). `houlsby` adapts both branches, `pfeiffer` the
  MLP only; down [D, Q], up [Q, D], Q = `adapter_size`.
- Params are stacked over layers like the blocks, `{"blocks": {"attn"|"mlp": {"adapter":
  {"down": [L, D, Q], "down_bias": [L, Q], "up": [L, Q, D], "up_bias": [L, D]}}}}`, so the
  layer scan slices them with the block params; the block calls the hook (`layer_hook`) at
  "attn/adapter" and "mlp/adapter". Model-width axes are `embed` (sharded like the weights
  that read the residual stream), the bottleneck axis is replicated.
- `down` is random (kaiming-uniform, bound 1/sqrt(D), as LoRA's A), `up` and both biases
  are zero: a fresh adapter is the identity, so training starts exactly at the base. The
  frozen tree is the whole base, as for LoRA.
- Not linear in any weight, adapters cannot be merged into the base: a run exports them in
  our own format (`save`, `load`): adapter_config.json (`peft_type: BOTTLENECK_ADAPTER`) and
  adapter_model.safetensors with per-layer tensors named like Hugging Face modules,
  `model.layers.{i}.{self_attn|mlp}.adapter.{down_proj|up_proj}.{weight|bias}`, weights in
  torch's Linear layout [out, in] (docs/training.md shows the forward hook that applies them).

Contract:
    places(cfg) -> ("attn", "mlp") or ("mlp",)
    shapes(cfg, n_layers, d_model) -> {path: shape};  specs(cfg) -> logical PartitionSpec tree
    init(cfg, n_layers, d_model, key) -> adapters (float32);  count(model_cfg) -> int
    layer_hook(layer_adapters, cfg) -> adapt(path, x, w, y)  (inside the layer scan)
    save(adapters, cfg, out_dir, base_model) -> files
    load(adapter_dir, n_layers, d_model) -> (the directory's adapter fields, adapters)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.model import paths
from jaxsft.model.families import resolve
from jaxsft.model.safetensors_io import TensorIndex, TensorSpec, _write_file

PEFT_TYPE = "BOTTLENECK_ADAPTER"
_ACTIVATIONS = {"relu": jax.nn.relu, "silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}
_HF_MODULES = {"attn": "self_attn", "mlp": "mlp"}
_HF_TENSORS = {
    "down": "down_proj.weight",
    "down_bias": "down_proj.bias",
    "up": "up_proj.weight",
    "up_bias": "up_proj.bias",
}


def places(cfg: PeftConfig) -> tuple[str, ...]:
    return ("attn", "mlp") if cfg.adapter_placement == "houlsby" else ("mlp",)


def shapes(cfg: PeftConfig, n_layers: int, d_model: int) -> dict[str, tuple[int, ...]]:
    """{"blocks/mlp/adapter/down": (L, D, Q), ...} for every adapted branch."""
    layers, d, a = n_layers, d_model, cfg.adapter_size
    node = {"down": (layers, d, a), "down_bias": (layers, a), "up": (layers, a, d), "up_bias": (layers, d)}
    return {f"blocks/{place}/adapter/{k}": s for place in places(cfg) for k, s in node.items()}


def specs(cfg: PeftConfig) -> dict:
    node = {
        "down": P("layers", "embed", None),
        "down_bias": P("layers", None),
        "up": P("layers", None, "embed"),
        "up_bias": P("layers", "embed"),
    }
    return paths.unflatten({f"blocks/{place}/adapter/{k}": s for place in places(cfg) for k, s in node.items()})


def init(cfg: PeftConfig, n_layers: int, d_model: int, key: jax.Array) -> dict:
    """down ~ U(-1/sqrt(D), 1/sqrt(D)); up and the biases 0 (the identity); float32."""
    all_shapes = shapes(cfg, n_layers, d_model)
    downs = [path for path in all_shapes if path.endswith("/down")]
    flat = {path: jnp.zeros(shape, jnp.float32) for path, shape in all_shapes.items()}
    for k, path in zip(jax.random.split(key, len(downs)), downs):
        bound = 1.0 / math.sqrt(all_shapes[path][1])
        flat[path] = jax.random.uniform(k, all_shapes[path], jnp.float32, -bound, bound)
    return paths.unflatten(flat)


def count(model_cfg: ModelConfig) -> int:
    m = resolve(model_cfg)
    return sum(math.prod(s) for s in shapes(m.peft, m.n_layers, m.d_model).values())


def layer_hook(layer_adapters: dict | None, cfg: PeftConfig):
    """`adapt(path, x, w, y)` for one block: at "attn/adapter" / "mlp/adapter" y -> y + adapter(y)."""
    if layer_adapters is None:
        return None
    activation = _ACTIVATIONS[cfg.adapter_activation]

    def adapt(path: str, x, w, y_BxTxD):
        group, name = path.split("/")
        node = layer_adapters.get(group, {}).get(name) if name == "adapter" else None
        if node is None:
            return y_BxTxD
        dt = y_BxTxD.dtype
        h_BxTxQ = jnp.einsum("btd,dq->btq", y_BxTxD, node["down"].astype(dt)) + node["down_bias"].astype(dt)
        out_BxTxD = jnp.einsum("btq,qd->btd", activation(h_BxTxQ), node["up"].astype(dt))
        return y_BxTxD + out_BxTxD + node["up_bias"].astype(dt)

    return adapt


# ---------------------------------------------------------------------------- files


def _name(place: str, i: int, key: str) -> str:
    return f"model.layers.{i}.{_HF_MODULES[place]}.adapter.{_HF_TENSORS[key]}"


def save(adapters: dict, cfg: PeftConfig, out_dir: str | Path, base_model: str = "") -> list[str]:
    """adapter_config.json + adapter_model.safetensors (float32, torch Linear layouts)."""
    n_layers, d_model, _ = paths.get(adapters, f"blocks/{places(cfg)[0]}/adapter/down").shape
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for place in places(cfg):
        for key, x in paths.get(adapters, f"blocks/{place}/adapter").items():
            x = np.asarray(jax.device_get(x), np.float32)
            for i in range(x.shape[0]):
                tensors[_name(place, i, key)] = np.ascontiguousarray(x[i].T if x.ndim == 3 else x[i])
    specs_ = [TensorSpec(name, t.shape, np.dtype(np.float32)) for name, t in tensors.items()]
    _write_file(out_dir / "adapter_model.safetensors", specs_, tensors.__getitem__)
    config = {
        "peft_type": PEFT_TYPE,
        "format": "jaxsft",
        "format_version": 1,
        "adapter_size": cfg.adapter_size,
        "adapter_placement": cfg.adapter_placement,
        "adapter_activation": cfg.adapter_activation,
        "num_layers": int(n_layers),
        "hidden_size": int(d_model),
        "base_model_name_or_path": base_model,
        "applies_to": "h -> h + up_proj(act(down_proj(h))) on the output of each layer's self_attn (houlsby) "
        "and mlp, before the residual add",
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["adapter_config.json", "adapter_model.safetensors"]


def read_config(adapter_dir: str | Path) -> dict:
    adapter_dir = Path(adapter_dir)
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{adapter_dir}: no readable adapter_config.json ({e})") from None


def load(adapter_dir: str | Path, n_layers: int, d_model: int) -> tuple[dict, dict]:
    """({adapter_size, adapter_placement, adapter_activation}, adapters) of a directory `save` wrote."""
    found = read_config(adapter_dir)
    if found.get("peft_type") != PEFT_TYPE:
        raise ConfigError(f"{adapter_dir}: not a bottleneck adapter (peft_type {found.get('peft_type')})")
    if (found.get("num_layers"), found.get("hidden_size")) != (n_layers, d_model):
        raise ConfigError(
            f"{adapter_dir}: adapters for {found.get('num_layers')} layers of width {found.get('hidden_size')}, "
            f"the model has {n_layers} of width {d_model}"
        )
    fields = {k: found.get(k) for k in ("adapter_size", "adapter_placement", "adapter_activation")}
    if None in fields.values():
        raise ConfigError(f"{adapter_dir}: adapter_config.json lacks {[k for k, v in fields.items() if v is None]}")
    cfg = PeftConfig(method="adapter", **fields)
    try:
        index = TensorIndex(adapter_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    flat = {}
    for path, shape in shapes(cfg, n_layers, d_model).items():
        _, place, _, key = path.split("/")
        try:
            layers = [index.read(_name(place, i, key)) for i in range(shape[0])]
        except KeyError as e:
            raise ConfigError(f"{adapter_dir}: adapter_model.safetensors has no tensor {e}") from None
        flat[path] = jnp.asarray(np.stack([x.T if x.ndim == 2 else x for x in layers]), jnp.float32)
    return fields, paths.unflatten(flat)
