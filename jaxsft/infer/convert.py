"""`jaxsft convert`: a Hugging Face directory -> an Orbax checkpoint in our layout (`init_from: orbax:OUT`).

The weights are stored as our params (restored later straight onto a run's shardings, no
renaming or transposing) beside a copy of the directory's config and tokenizer files, and
the chat template in both transformers layouts with its stop ids, so `orbax:OUT` and its
exports chat like the original.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxsft.config import ModelConfig
from jaxsft.data.formats import DataError
from jaxsft.data.hf_tokenizer import HFTokenizer
from jaxsft.infer.hf_files import write_chat_files
from jaxsft.model import hf
from jaxsft.model.transformer import abstract_params

COPIED_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


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
    if (out_dir / "tokenizer.json").is_file():
        tokenizer = HFTokenizer(out_dir)
        try:
            if tokenizer.chat_template:
                write_chat_files(out_dir, tokenizer, "hf", base_dir=model_dir)
        except DataError:
            pass  # a tokenizer naming no eos: the copied files are all there is
