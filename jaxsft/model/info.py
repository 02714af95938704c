"""Parameter counts by group, from shapes alone (`nnx.eval_shape`: nothing is allocated).

Contract:
    param_groups(cfg, vocab_size) -> {group: count}   groups: embedding, attention, mlp, norms, lm_head
    describe(name_or_path) -> (ModelConfig, vocab_size)  a preset name or a Hugging Face directory
"""

from __future__ import annotations

import math
from pathlib import Path

from jaxsft.config import ConfigError, ModelConfig
from jaxsft.model import hf, paths
from jaxsft.model.families import PRESETS
from jaxsft.model.transformer import abstract_params

GROUPS = ("embedding", "attention", "mlp", "norms", "lm_head")


def _group(path: str) -> str:
    if "norm" in path:
        return "norms"
    if path.startswith("blocks/attn/"):
        return "attention"
    if path.startswith("blocks/mlp/"):
        return "mlp"
    return path  # embedding, lm_head


def param_groups(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for path, shape in paths.flatten(abstract_params(cfg, vocab_size)).items():
        counts[_group(path)] += math.prod(shape.shape)
    return counts


def describe(name_or_path: str) -> tuple[ModelConfig, int]:
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]
        return cfg, cfg.vocab_size
    path = Path(name_or_path.removeprefix("hf:"))
    if (path / "config.json").is_file():
        return hf.load_config(path)
    raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with config.json")


def format_groups(name: str, cfg: ModelConfig, counts: dict[str, int]) -> str:
    total = sum(counts.values())
    lines = [
        f"{name}: family {cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"heads {cfg.n_heads}/{cfg.n_kv_heads}x{cfg.head_dim}, d_ff {cfg.d_ff}"
    ]
    lines += [f"  {group:<10} {count:>16,}  {100 * count / total:5.1f}%" for group, count in counts.items() if count]
    lines.append(f"  {'total':<10} {total:>16,}")
    return "\n".join(lines)
