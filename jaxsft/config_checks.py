"""Cross-field checks of a config: each failure is one `ConfigError` line naming the keys.

Field types and choices are checked while the tree is built (config_load.py); what needs more
than one field at a time is checked here, before any data is read or anything compiled.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

from jaxsft import config_ranges
from jaxsft.config import LOGICAL_AXES, MESH_AXES, Config, ConfigError, DataConfig, SyntheticTasks


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Config) -> None:
    """Cross-field checks; every message names the keys involved."""
    config_ranges.check(cfg)  # every number within its range first
    m, d, t = cfg.model, cfg.data, cfg.train
    _require(m.d_model > 0 and m.n_layers > 0 and m.d_ff > 0, "model: d_model, n_layers, d_ff must be positive")
    _require(
        m.n_heads > 0 and m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0,
        f"model.n_heads={m.n_heads} must be a positive multiple of model.n_kv_heads={m.n_kv_heads}",
    )
    _require(m.head_dim > 0 and m.head_dim % 2 == 0, f"model.head_dim={m.head_dim}: expected a positive even number")
    _require(m.sliding_window >= 0, f"model.sliding_window={m.sliding_window}: expected 0 (off) or a positive number")
    _require(
        min(m.attn_logit_softcap, m.final_logit_softcap, m.query_pre_attn_scalar) >= 0,
        "model.attn_logit_softcap, final_logit_softcap, query_pre_attn_scalar: expected 0 (off) or positive",
    )
    _require(
        not m.init_from or m.init_from.startswith(("hf:", "orbax:")),
        f"model.init_from={m.init_from!r}: expected hf:/path/to/model_dir or orbax:/path (from jaxsft convert)",
    )
    _require(d.max_length >= 8, f"data.max_length={d.max_length}: expected at least 8")
    _require(
        0.0 <= d.max_dropped_fraction <= 1.0,
        f"data.max_dropped_fraction={d.max_dropped_fraction}: expected a value in [0, 1]",
    )
    _validate_sources(d)
    _require(
        d.virtual_shards == 0 or (d.virtual_shards > 0 and t.global_batch_size % d.virtual_shards == 0),
        f"data.virtual_shards={d.virtual_shards}: expected 0 (auto) or a divisor of train.global_batch_size="
        f"{t.global_batch_size}",
    )
    _require(t.steps > 0, f"train.steps={t.steps}: expected a positive number")
    _require(t.loss_chunk >= 0, f"train.loss_chunk={t.loss_chunk}: expected 0 (off) or a positive number of tokens")
    _require(
        t.micro_batches > 0 and t.global_batch_size % t.micro_batches == 0,
        f"train.global_batch_size={t.global_batch_size} must divide into train.micro_batches={t.micro_batches}",
    )
    _require(
        cfg.checkpoint.every > 0 and cfg.checkpoint.keep > 0, "checkpoint.every and checkpoint.keep must be positive"
    )
    _require(cfg.logging.log_every > 0, "logging.log_every must be positive")
    # A bf16 second moment cannot move by less than ~0.4% per step: with b2 near 1 it stops
    # decaying at all (0.999 * nu rounds back to nu).
    _require(
        cfg.optim.moments_dtype == "float32" or cfg.optim.b2 <= 0.99,
        f"optim.moments_dtype=bfloat16 needs optim.b2 <= 0.99 (got {cfg.optim.b2}): a bf16 second moment "
        "cannot follow smaller steps; use float32 moments",
    )
    sizes = {axis: getattr(cfg.mesh, axis) for axis in MESH_AXES}
    _require(
        all(s == -1 or s > 0 for s in sizes.values()) and list(sizes.values()).count(-1) <= 1,
        f"mesh: axis sizes {sizes}: expected positive sizes and at most one -1",
    )
    for axis in MESH_AXES:
        dcn = getattr(cfg.mesh, f"dcn_{axis}")
        _require(dcn > 0, f"mesh.dcn_{axis}={dcn}: expected a positive size (no -1 over DCN)")
    for name in LOGICAL_AXES:
        axes = getattr(cfg.mesh.rules, name)
        for axis in axes:
            _require(
                axis in MESH_AXES,
                f"mesh.rules.{name}: unknown mesh axis {axis!r} (expected one of {', '.join(MESH_AXES)})",
            )
        _require(len(set(axes)) == len(axes), f"mesh.rules.{name}: mesh axis listed twice in {list(axes)}")
    pe = m.peft
    _require(pe.rank > 0, f"model.peft.rank={pe.rank}: expected a positive number")
    _require(0.0 <= pe.dropout < 1.0, f"model.peft.dropout={pe.dropout}: expected a value in [0, 1)")
    _require(
        bool(pe.targets) or not pe.adapters,
        "model.peft.targets: expected at least one of q, k, v, o, gate, up, down, all-linear or a regex",
    )
    _require(
        pe.method != "freeze" or bool(pe.trainable) or pe.top_layers > 0,
        "model.peft: method freeze needs model.peft.trainable patterns or model.peft.top_layers > 0",
    )
    _require(pe.top_layers >= 0, f"model.peft.top_layers={pe.top_layers}: expected 0 or more")
    _require(
        not pe.init_from or pe.method in ("lora", "dora", "adapter", "prefix_tuning", "prompt_tuning"),
        "model.peft.init_from: only for method lora, dora, adapter, prefix_tuning or prompt_tuning",
    )
    if pe.method in ("prefix_tuning", "prompt_tuning"):  # model/prompts.py: attention must take a prefix
        _require(
            m.attention in ("xla", "auto"),
            f"model.peft.method={pe.method} needs model.attention xla or auto: the {m.attention} kernel cannot "
            "take a prefix",
        )
        _require(
            m.sliding_window == 0,
            f"model.peft.method={pe.method}: sliding-window attention (model.sliding_window={m.sliding_window}) "
            "cannot take a prefix yet; use lora, dora or adapter",
        )
    _require(
        pe.quantize == "none" or pe.adapters,
        f"model.peft.quantize={pe.quantize}: a quantised frozen base (QLoRA) needs model.peft.method lora or dora, "
        f"not {pe.method} (full fine-tuning and freeze train the base itself)",
    )
    _require(
        pe.quantize != "nf4" or pe.quant_block_size % 2 == 0,
        f"model.peft.quant_block_size={pe.quant_block_size}: nf4 packs two codes per byte, expected an even size",
    )
    _require(
        not pe.double_quant or (pe.quantize != "none" and pe.quant_block_size > 0),
        "model.peft.double_quant: needs model.peft.quantize int8 or nf4 and model.peft.quant_block_size > 0",
    )


def check_paths(cfg: Config) -> None:
    """Every path a run reads exists: one line each (exit 2), checked before any data is read."""
    from jaxsft.data import reading

    for key, spec in (("model.init_from", cfg.model.init_from), ("model.peft.init_from", cfg.model.peft.init_from)):
        directory = spec.split(":", 1)[1] if spec.startswith(("hf:", "orbax:")) else spec
        _require(not spec or Path(directory).expanduser().is_dir(), f"{key}={spec}: {directory} is not a directory")
    tokenizer = cfg.data.tokenizer
    if tokenizer.startswith("hf:"):
        _require(
            Path(tokenizer[3:]).expanduser().is_dir(), f"data.tokenizer={tokenizer}: {tokenizer[3:]} is not a directory"
        )
    else:
        _require(not tokenizer or Path(tokenizer).is_file(), f"data.tokenizer={tokenizer}: no such file")
    reading.check_files(cfg.data)


def _validate_sources(d: DataConfig) -> None:
    for k, src in enumerate(d.sources):
        key = f"data.sources[{k}]"
        _require(src.weight >= 0, f"{key}.weight={src.weight}: expected a non-negative number")
        _require(0.0 <= src.eval_fraction < 1.0, f"{key}.eval_fraction={src.eval_fraction}: expected [0, 1)")
        _require(bool(src.path) or src.type == "synthetic", f"{key}.path: required (a file, glob or tfds name)")
        _require(
            src.type != "synthetic" or src.path in ("", *get_args(SyntheticTasks)),
            f"{key}.path={src.path!r}: a synthetic source names its task set, one of "
            f"{', '.join(get_args(SyntheticTasks))}",
        )
    _require(not d.sources or sum(s.weight for s in d.sources) > 0, "data.sources: every weight is 0")
    _require(
        not (d.sources and (d.train_files or d.eval_files)),
        "data.train_files/eval_files: use either them or data.sources, not both",
    )
    starts = [st.start_step for st in d.stages]
    _require(
        starts == sorted(set(starts)) and (not starts or starts[0] == 0),
        f"data.stages: start_step values {starts} must increase and begin at 0",
    )
    for k, st in enumerate(d.stages):
        _require(bool(d.sources), "data.stages: needs data.sources (stages weight sources by name)")
        for name, w in st.weights.items():
            _require(w >= 0, f"data.stages[{k}].weights.{name}={w}: expected a non-negative number")
        _require(sum(st.weights.values()) > 0, f"data.stages[{k}].weights: expected a positive weight")
