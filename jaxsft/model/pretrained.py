"""Where a run's starting weights come from: `model.init_from`.

Contract:
    resolve_config(cfg) -> ModelConfig      shapes from init_from's config.json (tensors checked), else the preset
    load_pretrained(cfg, vocab_size, shardings) -> params placed on `shardings` (QLoRA: the quantised base)

`hf:/dir` reads a Hugging Face directory (safetensors, streamed one tensor at a time).
`orbax:/dir` reads the output of `jaxsft convert`: the same params already in our layout
as an Orbax checkpoint (restored straight onto the shardings, no renaming or
transposing), next to a copy of the Hugging Face config.json and tokenizer files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxsft.config import ConfigError, ModelConfig
from jaxsft.model import hf, paths, quant
from jaxsft.model.families import resolve
from jaxsft.model.transformer import abstract_params

PREFIXES = ("hf:", "orbax:")


def _source(init_from: str) -> tuple[str, Path]:
    for prefix in PREFIXES:
        if init_from.startswith(prefix):
            return prefix, Path(init_from[len(prefix) :]).expanduser().absolute()
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
            raise ConfigError(
                f"model.{field.name}={ours!r} conflicts with {directory}/config.json ({theirs!r}); "
                f"with model.init_from the checkpoint decides the shapes"
            )
    return checkpoint


def load_pretrained(cfg: ModelConfig, vocab_size: int, shardings: dict) -> dict:
    prefix, directory = _source(cfg.init_from)
    if prefix == "hf:":  # QLoRA: quantised tensor by tensor as they stream in
        return hf.load_params(directory, cfg, vocab_size, shardings)
    quantized = cfg.peft.quantize != "none"
    # QLoRA from Orbax: the full base is restored (each kernel on its codes' sharding), then quantised.
    full = _kernels_on_codes(shardings) if quantized else shardings
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_params(cfg, vocab_size), full
    )
    if not (directory / "params").is_dir():
        raise ConfigError(f"model.init_from={cfg.init_from}: no params/ checkpoint (made by `jaxsft convert`)")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", target)
    if not quantized:
        return params
    return jax.jit(lambda p: quant.quantize_base(p, cfg.peft), out_shardings=shardings)(params)


def _kernels_on_codes(shardings: dict) -> dict:
    """Shardings of the full base from a quantised base's: each kernel where its codes are (same rank)."""
    out = paths.unflatten(paths.flatten(shardings))
    for path in quant.KERNEL_PATHS:
        paths.put(out, path, paths.get(shardings, path)["codes"])
    return out
