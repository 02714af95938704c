"""The run directory is the record of what produced its steps.

`RUN/config.yaml` holds the config of the latest invocation. Re-running a directory that
holds checkpoints with a config that differs from it is refused before any data is read
(`ConfigError`, one line naming the differences, exit 2), unless a difference is one of the
SAFE keys below (how the run is computed, logged or checkpointed, not what it learns) or
the caller allows the change (`jaxsft train --allow-config-change`). Every accepted
difference, safe or allowed, is appended to `RUN/config_history.jsonl` with the step it
applies from, old and new values, before `config.yaml` is rewritten: the config that
produced any step is config.yaml with the later history lines undone.

Raising `train.steps` is safe and prints what it does to the schedule: the warmup + cosine
schedule is a function of the step and the total, so from the resumed step on it follows
the cosine over the new total (the learning rate jumps to that curve's value there).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from jaxsft import config_load
from jaxsft.config import Config, ConfigError

HISTORY_NAME = "config_history.jsonl"
# Keys (or prefixes ending in ".") whose change leaves what the run learns as it was.
SAFE = (
    "logging.",
    "eval.",
    "mesh.",
    "train.run_dir",
    "train.eval_every",
    "train.eval_batches",
    "train.max_skipped_steps",
    "train.micro_batches",
    "train.loss_chunk",
    "checkpoint.every",
    "checkpoint.keep",
    "checkpoint.async_save",
    "checkpoint.on_corrupt",
    "model.remat",
    "model.attention",
)
_ABSENT = object()


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def differences(saved: dict, cfg: Config) -> dict[str, tuple]:
    """{dotted key: (saved value, new value)}; a key the saved tree lacks counts as its default."""
    new, default = _flat(config_load.to_dict(cfg)), _flat(config_load.to_dict(Config()))
    old = {**default, **_flat(saved)}
    keys = list(new) + [k for k in old if k not in new]
    return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in keys if old.get(k, _ABSENT) != new.get(k, _ABSENT)}


def _safe(key: str, old, new) -> bool:
    if key == "train.steps":
        return isinstance(old, int) and new > old
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE)


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def _summary(diffs: dict, limit: int = 4) -> str:
    shown = [f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in list(diffs.items())[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(shown) + more


def _has_checkpoints(run_dir: Path) -> bool:
    directory = run_dir / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check(cfg: Config, allow_change: bool = False) -> dict[str, tuple]:
    """The differences from `RUN/config.yaml` that this invocation will record; raises
    `ConfigError` (one line) for a difference that is not safe unless `allow_change`.
    Nothing to compare (a fresh directory, or one without checkpoints): no differences."""
    run_dir = Path(cfg.train.run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file() or not _has_checkpoints(run_dir):
        return {}
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            f"{path} cannot be read ({' '.join(str(e).split())}); restore it or use a new train.run_dir"
        ) from None
    diffs = differences(saved if isinstance(saved, dict) else {}, cfg)
    unsafe = {k: d for k, d in diffs.items() if not _safe(k, *d)}
    if unsafe and not allow_change:
        raise ConfigError(
            f"{run_dir} was trained with another config ({path.name}): {_summary(unsafe)}; run with "
            f"the same config, use a new train.run_dir, or pass --allow-config-change to record the "
            f"change in {HISTORY_NAME}"
        )
    return diffs


def schedule_note(cfg: Config, old_steps: int, step: int) -> str:
    """What raising train.steps from `old_steps` does to the learning rate from `step` on."""
    from jaxsft.train.optim import schedule

    before, after = float(schedule(cfg.optim, old_steps)(step)), float(schedule(cfg.optim, cfg.train.steps)(step))
    return (
        f"train.steps {old_steps} -> {cfg.train.steps}: the learning-rate schedule now decays over "
        f"{cfg.train.steps} steps; from step {step} on it follows that curve (learning rate {before:.3g} "
        f"-> {after:.3g} at step {step + 1})"
    )


def record(cfg: Config, diffs: dict[str, tuple], step: int, say=print) -> None:
    """Appends the differences (from `step` on) to the history, then writes config.yaml."""
    run_dir = Path(cfg.train.run_dir)
    if diffs:
        line = {
            "step": step,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "changes": {k: [None if a is _ABSENT else a, None if b is _ABSENT else b] for k, (a, b) in diffs.items()},
        }
        with open(run_dir / HISTORY_NAME, "a") as f:
            f.write(json.dumps(line) + "\n")
        say(f"config changes from step {step} on (recorded in {run_dir / HISTORY_NAME}): {_summary(diffs)}")
        old_steps = diffs.get("train.steps", (None,))[0]
        if isinstance(old_steps, int) and old_steps < cfg.train.steps:
            say(schedule_note(cfg, old_steps, step))
    config_load.save(cfg, run_dir / "config.yaml")
