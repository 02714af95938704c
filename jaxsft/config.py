"""The config tree: one typed, frozen description of a whole run.

A run is `Config` and nothing else. YAML files state only what differs from the
defaults here; `--set a.b=c` overrides are parsed with the type of the field they set.
Every error is a `ConfigError` whose message is one line naming the key, the value and
what was expected, raised before any data is read or anything is compiled.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers")
# Outer to inner: `tensor` talks most, so it gets the fastest links; `sequence` splits the
# length axis of activations (GSPMD gathers keys and values for attention).
MESH_AXES = ("data", "fsdp", "sequence", "tensor")


class ConfigError(ValueError):
    """A bad config: the message is one line, fit to print as it is."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling (`rope_scaling.rope_type: llama3` in Hugging Face)."""

    type: str = "none"  # none | llama3
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning (jaxsft/model/peft.py); method none is full fine-tuning."""

    method: str = "none"  # none | lora | dora | freeze
    # lora / dora: adapters on block projections
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0  # on the adapter branch's input (training only)
    targets: tuple[str, ...] = ("q", "v")  # q k v o gate up down | all-linear | a regex over param paths
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    init_from: str = ""  # a HF PEFT adapter directory to continue training from (same rank and targets)
    # freeze: regexes over param paths ("embedding", "final_norm/scale", "blocks/3/attn/q_bias", ...);
    # only what matches trains
    trainable: tuple[str, ...] = ()
    top_layers: int = 0  # freeze: also train every param of the top N blocks

    @property
    def adapters(self) -> bool:
        return self.method in ("lora", "dora")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    # Structure: llama | mistral | qwen2 | qwen3 | gemma | gemma2 (jaxsft.model.families).
    family: str = "llama"
    # Named shapes (e.g. llama-3.1-8b); a field left at its default here takes the preset's value.
    preset: str = ""
    # "hf:/dir": shapes from its config.json, weights from its safetensors; "orbax:/dir": the
    # output of `jaxsft convert` (same, pre-converted). Read by fresh runs only.
    init_from: str = ""
    vocab_size: int | None = None  # None: the tokenizer's vocabulary size
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 32
    d_ff: int = 384
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    scan_layers: bool = True
    # none | full | dots_saveable | dots_with_no_batch_dims_saveable | offload (those dots saved to host memory)
    remat: str = "none"
    rope_scaling: RopeScaling = RopeScaling()
    sliding_window: int = 0  # 0: full attention; mistral: every layer, gemma2: even layers
    attn_logit_softcap: float = 0.0  # 0: off (gemma2: 50)
    final_logit_softcap: float = 0.0  # 0: off (gemma2: 30)
    query_pre_attn_scalar: float = 0.0  # queries scaled by its -1/2 power; 0: head_dim
    # xla (reference, any platform) | cudnn (GPU) | splash (TPU) | pallas_gpu (GPU Triton) | auto
    # (tpu: splash, gpu: cudnn, else xla). Pallas kernels run interpreted on cpu. docs/models.md
    attention: str = "xla"
    peft: PeftConfig = PeftConfig()  # parameter-efficient fine-tuning; full fine-tuning by default


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One data source of a mixture (docs/data.md)."""

    path: str = ""  # file or glob (jsonl[.gz], parquet, arrayrecord); tfds: the dataset name
    type: str = "auto"  # auto (by extension) | jsonl | parquet | arrayrecord | tfds | synthetic
    name: str = ""  # in reports and data.stages; default: the file name (or tfds/synthetic name)
    format: str = "messages"  # messages | alpaca | sharegpt | prompt_completion | text
    columns: dict[str, str] = dataclasses.field(default_factory=dict)  # format field -> record key
    weight: float = 1.0  # expected share of sampled examples (or tokens, data.weight_by)
    eval_path: str = ""  # held-out records of this source (same type and format)
    eval_fraction: float = 0.0  # else hold out this share of the records, by position
    split: str = "train"  # tfds split
    eval_split: str = ""  # tfds split for eval
    data_dir: str = ""  # tfds data_dir
    examples: int = 20000  # synthetic: train records
    eval_examples: int = 512  # synthetic: eval records


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """From `start_step` on, sample the sources with these weights (by source name)."""

    start_step: int = 0
    weights: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # Empty: one source from train_files/eval_files (JSONL, `messages`), else the synthetic tasks.
    sources: tuple[SourceConfig, ...] = ()
    stages: tuple[StageConfig, ...] = ()  # a curriculum; empty: the sources' own weights throughout
    weight_by: str = "examples"  # examples | tokens: what a source weight is a share of
    # JSONL files in the `messages` format (shorthand for one source).
    train_files: tuple[str, ...] = ()
    eval_files: tuple[str, ...] = ()
    synthetic_train_examples: int = 20000
    synthetic_eval_examples: int = 512
    template: str = "chatml"  # chatml | llama2 | llama3 | gemma | alpaca | xml | json | hf
    # A SentencePiece .model, or hf:/model/dir; empty means train a SentencePiece model (cached).
    tokenizer: str = ""
    tokenizer_vocab_size: int = 512
    loss_on: str = "assistant"  # assistant | last | all
    train_on_eot: bool = True  # the end-of-turn token after a trained turn is trained
    reasoning: str = "train"  # an assistant's `reasoning`: train | mask | drop
    max_length: int = 256  # tokens per packed row
    overlong: str = "truncate"  # truncate (keep the start, whole turns first) | drop
    packing: str = "first_fit"  # first_fit | best_fit | concat | none
    shuffle: bool = True
    on_bad_record: str = "skip"  # skip (count and report) | raise (stop at the first)
    max_dropped_fraction: float = 0.05
    worker_count: int = 0  # Grain worker processes; 0 = in the main process
    # The train stream is V independent streams, each giving a fixed block of every global
    # batch's rows; the batches are the same under any process count, and a process builds
    # only the blocks its devices hold (V a multiple of the processes avoids duplicate work).
    # Divides train.global_batch_size; 0: its largest divisor up to 8.
    virtual_shards: int = 0


@dataclasses.dataclass(frozen=True)
class LogicalRules:
    """Which mesh axes each logical axis is split over (empty: replicated)."""

    batch: tuple[str, ...] = ("data", "fsdp")
    # `sequence` splits the length of activations; weights are split over it as over fsdp
    # (ZeRO-3 over every axis that splits the tokens), else each sequence group holds a copy.
    length: tuple[str, ...] = ("sequence",)
    embed: tuple[str, ...] = ("fsdp", "sequence")
    mlp: tuple[str, ...] = ("tensor",)
    heads: tuple[str, ...] = ("tensor",)
    kv_heads: tuple[str, ...] = ("tensor",)
    head_dim: tuple[str, ...] = ()
    vocab: tuple[str, ...] = ("tensor",)
    layers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes (of one slice when dcn_* > 1)
    fsdp: int = 1
    sequence: int = 1
    tensor: int = 1
    # Multi-slice / multi-node: each axis is also split this many ways over the slow network
    # (DCN); the mesh axis is then ici * dcn long (docs/training.md, "Hybrid meshes").
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_sequence: int = 1
    dcn_tensor: int = 1
    # A named rules table (see STRATEGIES); empty: `rules` as written.
    strategy: str = ""
    rules: LogicalRules = LogicalRules()


_TP = ("tensor",)
# Named sharding strategies: presets of the logical-to-mesh rules. Axes of size 1 drop
# out, so each preset still runs on any mesh shape.
STRATEGIES = {
    # Replicated weights and optimizer state; the batch over every data-like axis.
    "dp": LogicalRules(embed=(), mlp=(), heads=(), kv_heads=(), vocab=()),
    # ZeRO-3 style: weights and moments split on their embedding dimension over fsdp.
    "fsdp": LogicalRules(mlp=(), heads=(), kv_heads=(), vocab=()),
    # Megatron style: heads, MLP and vocabulary split over tensor; batch over data only.
    "tp": LogicalRules(batch=("data",), embed=()),
    # Both: the default table.
    "fsdp_tp": LogicalRules(mlp=_TP, heads=_TP, kv_heads=_TP, vocab=_TP),
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    end_learning_rate_ratio: float = 0.1  # cosine decays to this share of the peak
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    moments_dtype: str = "float32"  # Adam's two moments: float32 | bfloat16 (half the bytes)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/demo"
    steps: int = 300
    global_batch_size: int = 16  # packed rows per optimizer step, over all devices
    micro_batches: int = 1  # gradient accumulation: rows are split into this many
    # > 0: cross-entropy over chunks of this many tokens, never the full [B, T, V] logits
    loss_chunk: int = 0
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 4


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    enabled: bool = True
    every: int = 100
    keep: int = 2
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True  # rich progress bar; off gives one line per log_every
    log_every: int = 10
    metrics_file: str = "metrics.jsonl"


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()


CHOICES = {
    "mesh.strategy": ("", "dp", "fsdp", "tp", "fsdp_tp"),
    "model.peft.method": ("none", "lora", "dora", "freeze"),
    "model.family": ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"),
    "model.rope_scaling.type": ("none", "llama3"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "optim.moments_dtype": ("float32", "bfloat16"),
    "model.attention": ("xla", "cudnn", "splash", "pallas_gpu", "auto"),
    "model.remat": ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "offload"),
    "data.template": ("chatml", "llama2", "llama3", "gemma", "alpaca", "xml", "json", "hf"),
    "data.overlong": ("truncate", "drop"),
    "data.packing": ("first_fit", "best_fit", "concat", "none"),
    "data.weight_by": ("examples", "tokens"),
    "data.loss_on": ("assistant", "last", "all"),
    "data.reasoning": ("train", "mask", "drop"),
    "data.on_bad_record": ("skip", "raise"),
    "data.sources.type": ("auto", "jsonl", "parquet", "arrayrecord", "tfds", "synthetic"),
    "data.sources.format": ("messages", "alpaca", "sharegpt", "prompt_completion", "text"),
}

# ---------------------------------------------------------------------------- building


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp) -> Any:
    """Checks `value` against the annotation `tp` and returns it in that type."""
    origin = typing.get_origin(tp)
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
            raise ConfigError(f"{key}: expected a mapping of {_type_name(key_tp)} to {_type_name(value_tp)}, "
                              f"got {value!r}")
        return {_coerce(f"{key}.<key>", k, key_tp): _coerce(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "3e-4" (no dot) as a string; take it as the number it plainly is.
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    choices = CHOICES.get(re.sub(r"\[\d+\]", "", key))
    if choices and value not in choices:
        shown = ", ".join(c or '""' for c in choices)
        raise ConfigError(f"{key}: expected one of {shown}, got {value!r}")
    return value


def _unknown_key(prefix: str, key: str, valid) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {prefix}{key}{hint} (valid under {prefix or 'top level'}: "
                       f"{', '.join(valid)})")


def _build(cls, raw: dict, prefix: str = ""):
    hints = _hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown_key(prefix, str(key), valid)
        kwargs[key] = _coerce(prefix + key, value, hints[key])
    return cls(**kwargs)


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
    from jaxsft.config_checks import validate  # the checks need the classes above

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
    return from_dict(apply_overrides(raw, list(overrides)))


def dump(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(dump(cfg))


# ---------------------------------------------------------------------------- validation
