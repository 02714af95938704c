"""A pretrained model's tokenizer travels with it.

Contract:
    with_model_tokenizer(cfg) -> cfg   `data.tokenizer` empty and `model.init_from` a directory that
                                       holds a tokenizer: `data.tokenizer` becomes that tokenizer
                                       (`hf:DIR`, or `DIR/tokenizer.model` for a jaxsft SentencePiece
                                       export), so pretrained weights never meet a freshly trained
                                       vocabulary. A directory without one keeps the old default (a
                                       SentencePiece model trained on the data) and `fallback_note` says so.
    check_belongs(tokenizer, vocab_size, cfg)  ConfigError (one line) when the tokenizer has more
                                       tokens than the model's embedding, or an eos/bos/pad/special id
                                       outside it: it is not the model's tokenizer.
    describe(cfg, tokenizer) -> str    which weights and which tokenizer a run loaded (printed at start).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxsft.config import Config, ConfigError
from jaxsft.data.formats import DataError

PREFIXES = ("hf:", "orbax:")


def _directory(init_from: str) -> Path | None:
    for prefix in PREFIXES:
        if init_from.startswith(prefix):
            return Path(init_from[len(prefix) :]).expanduser()
    return None


def model_tokenizer_spec(init_from: str) -> str | None:
    """The tokenizer `init_from`'s directory carries, as a `data.tokenizer` spec, or None."""
    directory = _directory(init_from)
    if directory is None:
        return None
    if (directory / "tokenizer.json").is_file():
        return f"hf:{directory}"
    if (directory / "tokenizer.model").is_file():
        return str(directory / "tokenizer.model")
    return None


def with_model_tokenizer(cfg: Config) -> Config:
    if cfg.data.tokenizer or not cfg.model.init_from:
        return cfg
    spec = model_tokenizer_spec(cfg.model.init_from)
    return cfg if spec is None else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=spec))


def fallback_note(cfg: Config) -> str | None:
    """A warning when pretrained weights train with a freshly trained tokenizer."""
    if cfg.data.tokenizer or not cfg.model.init_from:
        return None
    return (
        f"model.init_from={cfg.model.init_from} holds no tokenizer (tokenizer.json or tokenizer.model): "
        f"training a SentencePiece tokenizer whose ids the pretrained embeddings do not know; "
        f"set data.tokenizer to the model's own"
    )


def _name(cfg: Config) -> str:
    return cfg.data.tokenizer or "a SentencePiece model trained on the data"


def check_belongs(tokenizer, vocab_size: int, cfg: Config) -> None:
    where = f"model.init_from={cfg.model.init_from}" if cfg.model.init_from else f"model.vocab_size={vocab_size}"
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(
            f"data.tokenizer ({_name(cfg)}) has {tokenizer.vocab_size} tokens, more than the "
            f"model's embedding ({vocab_size}, {where}): it is not this model's tokenizer"
        )
    specials = {}
    try:
        specials["eos"] = tokenizer.eos_id
    except DataError:
        pass  # a tokenizer that names no eos: its other special tokens are still checked
    specials.update({"bos": tokenizer.bos_id, "pad": tokenizer.pad_id, **getattr(tokenizer, "special_tokens", {})})
    outside = {k: v for k, v in specials.items() if v is not None and not 0 <= v < vocab_size}
    if outside:
        name, i = next(iter(outside.items()))
        raise ConfigError(
            f"data.tokenizer ({_name(cfg)}): special token {name} has id {i}, outside the model's "
            f"embedding ({vocab_size}, {where}): it is not this model's tokenizer"
        )


def describe(cfg: Config, tokenizer) -> str:
    weights = cfg.model.init_from or f"a fresh init (seed {cfg.train.seed})"
    source = cfg.data.tokenizer or f"SentencePiece trained on the data ({getattr(tokenizer, 'path', '')})"
    template = " with a chat template" if getattr(tokenizer, "chat_template", None) else ""
    return (
        f"weights: {weights}; tokenizer: {source} ({tokenizer.vocab_size} tokens{template}); "
        f"data.template {cfg.data.template}"
    )
