"""Where a run's starting weights come from: `model.init_from`.

Contract:
    resolve_config(cfg) -> ModelConfig      shapes from init_from's config.json (tensors checked), else the preset
    load_pretrained(cfg, vocab_size, shardings) -> params placed on `shardings`
    convert(model_dir, out_dir, param_dtype) -> out_dir

`hf:/dir` reads a Hugging Face directory (safetensors, streamed one tensor at a time).
`orbax:/dir` reads the output of `jaxsft convert`: the same params already in our layout
as an Orbax checkpoint (restored straight onto the shardings, no renaming or
transposing), next to a copy of the Hugging Face config.json and tokenizer files.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxsft.config import ConfigError, ModelConfig
from jaxsft.model import hf
from jaxsft.model.families import resolve

PREFIXES = ("hf:", "orbax:")
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model")


def _source(init_from: str) -> tuple[str, Path]:
    for prefix in PREFIXES:
        if init_from.startswith(prefix):
            return prefix, Path(init_from[len(prefix):]).expanduser().absolute()
    raise ConfigError(f"model.init_from={init_from!r}: expected hf:/path or orbax:/path")


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """The model a run trains: shapes from `init_from`'s config.json, else from the preset."""
    if not cfg.init_from:
        return resolve(cfg)
    prefix, directory = _source(cfg.init_from)
    checkpoint = hf.load_config(directory, cfg)[0]
    if prefix == "hf:":
        hf.check(directory, checkpoint, checkpoint.vocab_size)  # headers only: fail before any work
    default = ModelConfig()
    for field in dataclasses.fields(ModelConfig):
        ours, theirs = getattr(cfg, field.name), getattr(checkpoint, field.name)
        if field.name != "preset" and ours != getattr(default, field.name) and ours != theirs:
            raise ConfigError(f"model.{field.name}={ours!r} conflicts with {directory}/config.json ({theirs!r}); "
                              f"with model.init_from the checkpoint decides the shapes")
    return checkpoint


def load_pretrained(cfg: ModelConfig, vocab_size: int, shardings: dict) -> dict:
    prefix, directory = _source(cfg.init_from)
    if prefix == "hf:":
        return hf.load_params(directory, cfg, vocab_size, shardings)
    shapes = hf.abstract_params(cfg, vocab_size)
    flat = traverse_util.flatten_dict(shardings, sep=".")
    target = traverse_util.unflatten_dict(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat[k]) for k, v in shapes.items()}, sep=".")
    if not (directory / "params").is_dir():
        raise ConfigError(f"model.init_from={cfg.init_from}: no params/ checkpoint (made by `jaxsft convert`)")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory / "params", target)


def convert(model_dir: str | Path, out_dir: str | Path, param_dtype: str = "float32") -> Path:
    """A Hugging Face directory -> an Orbax checkpoint in our layout (held once in host memory)."""
    model_dir, out_dir = Path(str(model_dir).removeprefix("hf:")), Path(out_dir)
    cfg, vocab = hf.load_config(model_dir, ModelConfig(param_dtype=param_dtype))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    shardings = traverse_util.unflatten_dict(
        {k: NamedSharding(mesh, P()) for k in hf.abstract_params(cfg, vocab)}, sep=".")
    params = hf.load_params(model_dir, cfg, vocab, shardings)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir.absolute() / "params", params)
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    return out_dir
