"""Hugging Face checkpoints in and out: names, layouts, streamed placement.

Job: map every jaxsft param to its Hugging Face tensor(s), load a safetensors model
directory straight onto a mesh one tensor at a time, and write params back out as a
directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

Contract:
    load_config(model_dir, base) -> (ModelConfig, vocab_size)
    check(model_dir, cfg, vocab_size) -> TensorIndex     all errors, before any compilation
    load_params(model_dir, cfg, vocab_size, shardings) -> params (pure dict of jax.Arrays)
    save_pretrained(params, cfg, vocab_size, out_dir, *, dtype, max_shard_bytes) -> files
    MODULES: block kernel path ("attn/q_proj") -> Hugging Face module ("self_attn.q_proj")

Layouts: Hugging Face linears are [out, in]; ours are [in, out] with heads split out
((d, n, h) for q/k/v, (n, h, d) for o). Our `blocks/*` params are stacked [L, ...]; each
layer comes from its own `model.layers.{i}.*` tensor and is written into the stacked
device buffer in place (donated), so host memory holds about one tensor at a time.
With `model.peft.quantize` (QLoRA) `shardings` are laid out like the quantised base and each
block kernel's layer is quantised on the mesh as it arrives (quant.py).
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import ConfigError, ModelConfig
from jaxsft.model import hf_config, paths, quant
from jaxsft.model.families import resolve, variant
from jaxsft.model.safetensors_io import DTYPES, TensorIndex, TensorSpec, write_sharded
from jaxsft.model.transformer import abstract_params

_LAYER = "model.layers.{i}."
# Each block kernel (path inside a block) and the Hugging Face module it is; hf_peft.py
# names adapters by the same modules.
MODULES = {
    "attn/q_proj": "self_attn.q_proj",
    "attn/k_proj": "self_attn.k_proj",
    "attn/v_proj": "self_attn.v_proj",
    "attn/o_proj": "self_attn.o_proj",
    "mlp/gate_proj": "mlp.gate_proj",
    "mlp/up_proj": "mlp.up_proj",
    "mlp/down_proj": "mlp.down_proj",
}
_KERNEL_LAYOUTS = {
    "attn/q_proj": "in_heads",
    "attn/k_proj": "in_heads",
    "attn/v_proj": "in_heads",
    "attn/o_proj": "out_heads",
}  # the MLP's are plain linears


def _block_names(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
    """Stacked param path -> (HF name inside a layer, layout kind)."""
    var = variant(cfg.family)
    names = {path: (f"{module}.weight", _KERNEL_LAYOUTS.get(path, "linear")) for path, module in MODULES.items()}
    names["attn_norm/scale"] = ("input_layernorm.weight", "vector")
    if var.qkv_bias:
        names.update({f"attn/{p}_bias": (f"self_attn.{p}_proj.bias", "vector") for p in "qkv"})
    if var.qk_norm:
        names.update({f"attn/{p}_norm/scale": (f"self_attn.{p}_norm.weight", "vector") for p in "qk"})
    if var.post_norms:
        names["post_attn_norm/scale"] = ("post_attention_layernorm.weight", "vector")
        names["mlp_norm/scale"] = ("pre_feedforward_layernorm.weight", "vector")
        names["post_mlp_norm/scale"] = ("post_feedforward_layernorm.weight", "vector")
    else:
        names["mlp_norm/scale"] = ("post_attention_layernorm.weight", "vector")
    return names


def tensor_map(cfg: ModelConfig) -> dict[str, tuple[str, str, int | None]]:
    """HF tensor name -> (our param path, layout kind, layer index or None)."""
    out = {
        "model.embed_tokens.weight": ("embedding", "same", None),
        "model.norm.weight": ("final_norm/scale", "vector", None),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ("lm_head", "linear", None)
    for path, (name, kind) in _block_names(cfg).items():
        for i in range(cfg.n_layers):
            out[_LAYER.format(i=i) + name] = ("blocks/" + path, kind, i)
    return out


def hf_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "in_heads":
        return (shape[1] * shape[2], shape[0])
    if kind == "out_heads":
        return (shape[2], shape[0] * shape[1])
    if kind == "linear":
        return (shape[1], shape[0])
    return (math.prod(shape),) if kind == "vector" else shape


def to_ours(kind: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return array.T.reshape(shape) if kind in ("in_heads", "out_heads", "linear") else array.reshape(shape)


def to_hf(kind: str, array: np.ndarray) -> np.ndarray:
    if kind == "in_heads":
        return array.reshape(array.shape[0], -1).T
    if kind == "out_heads":
        return array.reshape(-1, array.shape[-1]).T
    return array.T if kind == "linear" else array.reshape(hf_shape(kind, array.shape))


def load_config(model_dir: str | Path, base: ModelConfig = ModelConfig()) -> tuple[ModelConfig, int]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    return hf_config.from_hf(json.loads(path.read_text()), base, where=str(path))


def _layer_shape(path: str, shapes: dict) -> tuple[int, ...]:
    shape = tuple(shapes[path].shape)
    return shape[1:] if path.startswith("blocks/") else shape


def check(model_dir: str | Path, cfg: ModelConfig, vocab_size: int) -> TensorIndex:
    """Every name, shape and dtype against the model, from the headers alone; one-line errors."""
    try:
        index = TensorIndex(model_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    cfg = resolve(cfg)
    expected, shapes = tensor_map(cfg), paths.flatten(abstract_params(cfg, vocab_size))
    present = set(index.tensors)
    if cfg.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints still carry a copy
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing:
        raise ConfigError(f"{model_dir}: {len(missing)} missing tensor(s): {', '.join(missing[:8])}")
    if unexpected:
        raise ConfigError(f"{model_dir}: {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:8])}")
    for name, (path, kind, _) in expected.items():
        info, want = index.tensors[name], hf_shape(kind, _layer_shape(path, shapes))
        if info.shape != want:
            raise ConfigError(f"{model_dir}: tensor {name} has shape {list(info.shape)}, expected {list(want)}")
        if info.dtype not in DTYPES:
            raise ConfigError(f"{model_dir}: tensor {name} has dtype {info.dtype}, expected one of {', '.join(DTYPES)}")
    return index


@partial(jax.jit, donate_argnums=0, static_argnums=3)
def _set_layer(stacked, layer_array, i, dtype):
    return stacked.at[i].set(layer_array.astype(dtype))


def _place(array: np.ndarray, sharding) -> jax.Array:
    """Host array -> global array on `sharding`; each device copies only its own slice."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _layer_sharding(sharding):
    """Where one layer of a stacked param goes: its param's sharding less the 'layers' entry."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
    return sharding  # one device (jaxsft convert): every slice lives there


def load_params(model_dir: str | Path, cfg: ModelConfig, vocab_size: int, shardings: dict) -> dict:
    """Params as a pure dict (the train state's layout), each placed on `shardings` (same tree)."""
    cfg = resolve(cfg)
    index = check(model_dir, cfg, vocab_size)
    shapes = paths.flatten(abstract_params(cfg, vocab_size))
    flat_shardings = paths.flatten(shardings)
    dtype = jnp.dtype(cfg.param_dtype)
    placed: dict[str, jax.Array] = {}
    for name, (path, kind, layer) in tensor_map(cfg).items():
        sharding = flat_shardings.get(path)
        host = to_ours(kind, index.read(name), _layer_shape(path, shapes))
        if layer is None:
            placed[path] = jax.jit(lambda a: a.astype(dtype), out_shardings=sharding)(_place(host, sharding))
            continue
        if sharding is None:  # QLoRA (quant.py): each layer's kernel is quantised on the mesh as it arrives
            node_shardings = paths.get(shardings, path)
            if path not in placed:
                placed[path] = quant.zeros(path, shapes[path].shape, cfg.peft, node_shardings)
            # Rounded to param_dtype first: the same base as quantising the unquantised import.
            layer_array = _place(host, _layer_sharding(node_shardings["codes"])).astype(dtype)
            placed[path] = quant.set_layer(placed[path], layer_array, layer, path, cfg.peft)
            del host, layer_array
            continue
        if path not in placed:
            placed[path] = jax.jit(lambda: jnp.zeros(shapes[path].shape, dtype), out_shardings=sharding)()
        placed[path] = _set_layer(placed[path], _place(host, _layer_sharding(sharding)), layer, dtype)
        del host
    return paths.unflatten(placed)


def save_pretrained(
    params: dict,
    cfg: ModelConfig,
    vocab_size: int,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = 2 * 1024**3,
) -> list[str]:
    """Writes config.json and sharded safetensors + index; tensors are fetched one at a time."""
    cfg = resolve(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    flat = paths.flatten(params)
    np_dtype = np.dtype(jnp.dtype(dtype))
    mapping = tensor_map(cfg)
    specs = [
        TensorSpec(name, hf_shape(kind, _layer_shape(path, {path: flat[path]})), np_dtype)
        for name, (path, kind, _) in mapping.items()
    ]

    def fetch(name: str) -> np.ndarray:
        path, kind, layer = mapping[name]
        array = flat[path] if layer is None else flat[path][layer]
        return to_hf(kind, np.asarray(jax.device_get(array)).astype(np_dtype))

    files = write_sharded(out_dir, specs, fetch, max_shard_bytes)
    config = hf_config.to_hf(cfg, vocab_size, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return files
