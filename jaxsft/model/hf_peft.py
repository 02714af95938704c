"""Hugging Face PEFT adapter directories <-> our LoRA/DoRA adapters, both ways.

Job: write adapters as adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained` loads, and read such a directory (ours or PEFT's) back.

Contract:
    save_peft(adapters, cfg, out_dir, base_model) -> files (adapter_config.json + adapter_model.safetensors)
    load_peft(adapter_dir, params) -> (PeftConfig, adapters)   a HF PEFT LoRA/DoRA adapter, read back

Layouts: our A [L, *in, r] / B [L, r, *out] / m [L, *out] (lora.py) are per layer
lora_A [r, in] / lora_B [out, r] / lora_magnitude_vector [out] in PEFT, heads flattened
in Hugging Face's order; modules are named by the table hf.py maps checkpoints with.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import ConfigError, PeftConfig
from jaxsft.model import paths
from jaxsft.model.hf import MODULES
from jaxsft.model.lora import KERNELS, adapter_shapes, target_paths
from jaxsft.model.safetensors_io import TensorIndex, TensorSpec, _write_file

_PEFT_NAME = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"
_PEFT_MAGNITUDE = "base_model.model.model.layers.{i}.{module}.lora_magnitude_vector"


def _module(path: str) -> str:
    """A kernel's module inside a Hugging Face layer: blocks/attn/q_proj -> self_attn.q_proj."""
    return MODULES[path.removeprefix("blocks/")]


def _peft_name(path: str, i: int, key: str) -> str:
    module = _module(path)
    return (
        _PEFT_MAGNITUDE.format(i=i, module=module)
        if key == "m"
        else _PEFT_NAME.format(i=i, module=module, ab=key.upper())
    )


def _to_peft(key: str, x: np.ndarray, rank: int) -> np.ndarray:
    """One layer's A [*in, r] -> lora_A [r, in]; B [r, *out] -> lora_B [out, r]; m [*out] -> [out]."""
    return {"a": lambda: x.reshape(-1, rank).T, "b": lambda: x.reshape(rank, -1).T, "m": lambda: x.reshape(-1)}[key]()


def peft_tensors(adapters: dict, cfg: PeftConfig) -> dict[str, np.ndarray]:
    """PEFT's tensors per layer, in HF's flattened head order."""
    out = {}
    for path in target_paths(cfg):
        for key, x in paths.get(adapters, path).items():
            x = np.asarray(jax.device_get(x))
            for i in range(x.shape[0]):
                out[_peft_name(path, i, key)] = _to_peft(key, x[i], cfg.rank)
    return out


def peft_config(cfg: PeftConfig, base_model: str = "") -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.method == "dora",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
        "target_modules": sorted(_module(p).split(".")[-1] for p in target_paths(cfg)),
    }


def save_peft(adapters: dict, cfg: PeftConfig, out_dir: str | Path, base_model: str = "") -> list[str]:
    """Writes adapter_config.json + adapter_model.safetensors (float32), loadable by `peft.PeftModel`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in peft_tensors(adapters, cfg).items()}
    specs = [TensorSpec(name, t.shape, np.dtype(np.float32)) for name, t in tensors.items()]
    _write_file(out_dir / "adapter_model.safetensors", specs, tensors.__getitem__)
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
    return ["adapter_config.json", "adapter_model.safetensors"]


def load_peft(adapter_dir: str | Path, params) -> tuple[PeftConfig, dict]:
    """A HF PEFT LoRA or DoRA adapter directory as (PeftConfig, adapters) for `params` (shapes only are read)."""
    adapter_dir = Path(adapter_dir)
    try:
        peft = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{adapter_dir}: no readable adapter_config.json ({e})") from None
    if peft.get("peft_type") != "LORA" or peft.get("fan_in_fan_out"):
        raise ConfigError(
            f"{adapter_dir}: only LoRA/DoRA adapters are read (got peft_type={peft.get('peft_type')}, "
            f"fan_in_fan_out={peft.get('fan_in_fan_out')})"
        )
    modules = peft["target_modules"]
    modules = [modules] if isinstance(modules, str) else modules
    by_module = {_module(path).split(".")[-1]: short for short, (path, _) in KERNELS.items()}
    unknown = [m for m in modules if m not in by_module]
    if unknown:
        raise ConfigError(f"{adapter_dir}: target_modules {unknown} are not adaptable (expected {sorted(by_module)})")
    cfg = PeftConfig(
        method="dora" if peft.get("use_dora") else "lora",
        rank=int(peft["r"]),
        alpha=float(peft["lora_alpha"]),
        rslora=bool(peft.get("use_rslora", False)),
        targets=tuple(by_module[m] for m in modules),
    )
    index, tree = TensorIndex(adapter_dir), {}
    for path, shapes in adapter_shapes(params, cfg).items():
        node = {}
        for key, shape in shapes.items():
            layers = [index.read(_peft_name(path, i, key)) for i in range(shape[0])]
            layers = [x if key == "m" else x.T for x in layers]
            node[key] = jnp.asarray(np.stack([x.reshape(shape[1:]) for x in layers]), jnp.float32)
        paths.put(tree, path, node)
    return cfg, tree
