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

from jaxsft.config import ConfigError, ModelConfig
from jaxsft.model import hf
from jaxsft.model.families import resolve
from jaxsft.model.transformer import abstract_params

PREFIXES = ("hf:", "orbax:")
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "chat_template.jinja")


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
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract_params(cfg, vocab_size), shardings)
    if not (directory / "params").is_dir():
        raise ConfigError(f"model.init_from={cfg.init_from}: no params/ checkpoint (made by `jaxsft convert`)")
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(directory / "params", target)


def convert(model_dir: str | Path, out_dir: str | Path, param_dtype: str = "float32") -> Path:
    """A Hugging Face directory -> an Orbax checkpoint in our layout (held once in host memory).

    The params go to one device, no mesh: where a run later places them is its restore's business."""
    model_dir, out_dir = Path(str(model_dir).removeprefix("hf:")), Path(out_dir)
    cfg, vocab = hf.load_config(model_dir, ModelConfig(param_dtype=param_dtype))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_params(cfg, vocab))
    params = hf.load_params(model_dir, cfg, vocab, shardings)
    out_dir.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir.absolute() / "params", params)
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    _write_chat_files(model_dir, out_dir)
    return out_dir


def _write_chat_files(model_dir: Path, out_dir: Path) -> None:
    """The chat template in both layouts and the stop ids, so `orbax:OUT` and its exports chat."""
    from jaxsft.data.hf_tokenizer import HFTokenizer
    from jaxsft.infer.hf_files import write_chat_files

    from jaxsft.data.formats import DataError

    if (out_dir / "tokenizer.json").is_file():
        tokenizer = HFTokenizer(out_dir)
        try:
            if tokenizer.chat_template:
                write_chat_files(out_dir, tokenizer, "hf", base_dir=model_dir)
        except DataError:
            pass  # a tokenizer naming no eos: the copied files are all there is
