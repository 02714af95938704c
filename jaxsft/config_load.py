"""Loading a `Config`: YAML files, dotted `--set` overrides, coercion into the dataclasses, save.

Contract: `load(path, overrides)` returns a validated `Config` or raises `ConfigError` whose
message is one line naming the key, the value and what was expected (with close matches
for a misspelt key), before any data is read or anything is compiled. Each value is
checked against its field's annotation; a `Literal[...]` field lists its allowed values.
Names from a registry that code owns (chat templates) are checked against that registry.
`save` writes the resolved tree, which `load` reads back to an equal `Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jaxsft.config import MODEL_ARCHITECTURE_FIELDS, STRATEGIES, Config, ConfigError, ModelConfig
from jaxsft.config_checks import validate
from jaxsft.data.templates import TEMPLATE_NAMES


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _one_of(key: str, value: Any, choices) -> ConfigError:
    shown = ", ".join(c or '""' for c in choices)
    return ConfigError(f"{key}: expected one of {shown}, got {value!r}")


def _coerce(key: str, value: Any, tp) -> Any:
    """Checks `value` against the annotation `tp` and returns it in that type."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise _one_of(key, value, typing.get_args(tp))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping of {_type_name(key_tp)} to {_type_name(value_tp)}, got {value!r}"
            )
        return {_coerce(f"{key}.<key>", k, key_tp): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; take it as the number it plainly is.
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value}")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return value


def _unknown_key(prefix: str, key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(
        f"unknown config key {prefix}{key}{hint} (valid under {prefix or 'top level'}: {', '.join(valid)})"
    )


def _build(cls, raw: dict, prefix: str = ""):
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown_key(prefix, str(key), valid)
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


def _check_registered(cfg: Config) -> None:
    """Names that a registry in code owns, rather than a fixed `Literal`."""
    if cfg.data.template not in TEMPLATE_NAMES:
        raise _one_of("data.template", cfg.data.template, TEMPLATE_NAMES)


def _apply_strategy(cfg: Config, raw: dict) -> Config:
    """`mesh.strategy` sets `mesh.rules`; written rules must agree with it (a saved config does)."""
    name = cfg.mesh.strategy
    if not name:
        return cfg
    preset = STRATEGIES[name]
    if "rules" in (raw.get("mesh") or {}) and cfg.mesh.rules != preset:
        raise ConfigError(f"mesh.strategy={name} and mesh.rules disagree: set one of them")
    return dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, rules=preset))


def from_dict(raw: dict | None) -> Config:
    cfg = _apply_strategy(_build(Config, raw or {}), raw or {})
    _check_registered(cfg)
    validate(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """Plain YAML-able tree (tuples become lists)."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        return x

    return plain(cfg)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train.steps=50")
    key, raw_value = text.split("=", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError:
        value = raw_value
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Sets dotted keys in a raw tree; the types are checked when the tree is built."""
    raw = dict(raw)
    for text in overrides:
        path, value = _parse_override(text)
        node, cls, prefix = raw, Config, ""
        for part in path[:-1]:
            hints = _hints(cls)
            if part not in hints or not dataclasses.is_dataclass(hints[part]):
                raise _unknown_key(prefix, part, [f.name for f in dataclasses.fields(cls)])
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node, cls, prefix = node[part], hints[part], prefix + part + "."
        if path[-1] not in _hints(cls):
            raise _unknown_key(prefix, path[-1], [f.name for f in dataclasses.fields(cls)])
        node[path[-1]] = value
    return raw


def _shapes_from_overrides(raw: dict, model_overrides: dict) -> dict:
    """`model.preset` or `model.init_from` given as an override names the network, so the file's
    architecture fields give way (they would otherwise beat the preset, or conflict with the
    checkpoint: `jaxsft compile --set model.preset=llama-3.1-8b` without `--config` compiled the
    demo's 2-layer shape with 8B's widths). Architecture fields among the overrides still apply."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return raw
    named = [k for k in ("preset", "init_from") if model_overrides.get(k) and model.get(k) != model_overrides[k]]
    if not named:
        return raw
    gone = (*MODEL_ARCHITECTURE_FIELDS, "preset", "init_from")
    return {**raw, "model": {k: v for k, v in model.items() if k not in gone}}


def _check_preset_overrides(cfg: Config, model_overrides: dict) -> None:
    """A preset fills the model fields left at their defaults (families.resolve), so an
    override of a field to its default value cannot undo the preset's value: refused rather
    than ignored. (A saved config writes every field, so only overrides can say this.)"""
    from jaxsft.model.families import PRESETS

    preset = PRESETS.get(cfg.model.preset)
    if preset is None:
        return
    default = ModelConfig()
    for key in sorted(k for k in MODEL_ARCHITECTURE_FIELDS if k in model_overrides):
        ours, theirs = getattr(cfg.model, key), getattr(preset, key)
        if ours == getattr(default, key) and ours != theirs:
            raise ConfigError(
                f"model.{key}={ours!r} is the default, which model.preset={cfg.model.preset} replaces with "
                f"{theirs!r}; to change it, give the model's shape without a preset (`jaxsft model info "
                f"{cfg.model.preset}` prints it)"
            )


def load(path: str | Path | None, overrides: list[str] = ()) -> Config:
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
    overrides = list(overrides)
    model_overrides = {p[1]: v for p, v in map(_parse_override, overrides) if len(p) == 2 and p[0] == "model"}
    cfg = from_dict(apply_overrides(_shapes_from_overrides(raw, model_overrides), overrides))
    _check_preset_overrides(cfg, model_overrides)
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump(cfg))
