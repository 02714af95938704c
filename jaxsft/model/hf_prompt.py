"""Hugging Face PEFT prefix-tuning and prompt-tuning directories <-> our prefixes and prompts.

Job: write `prefix_tuning` / `prompt_tuning` params as adapter_config.json +
adapter_model.safetensors that `peft.PeftModel.from_pretrained(base, dir)` loads with the
logits we compute, and read such a directory (ours or PEFT's) back.

Layouts: PEFT keeps one tensor, `prompt_embeddings`:
- PREFIX_TUNING: [W, L * 2 * K * H]: per virtual token the keys and values of every layer,
  laid out [L, 2 (key, value), K, H] (PEFT's get_prompt views it as [W, 2L, K, H]: layer i's
  key at 2i, its value at 2i + 1). With `prefix_projection` we write the projection's output
  and `prefix_projection: false`: the MLP is a training device, the prefix is what the model
  sees, and PEFT loads it the same way (for inference it never runs the MLP either).
- PROMPT_TUNING: [W, D], the virtual tokens' input embeddings.
`token_dim` and `num_attention_heads` follow PEFT's own preparation of the config (for
prefixes under grouped-query attention: K * H and K).

Contract:
    save(cfg, trainable, out_dir, dims, base_model) -> files     dims = (L, D, N, K, H) of the base
    load(adapter_dir, params) -> (PeftConfig fields, trainable)   `params` (may be abstract) size the model
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import ConfigError, PeftConfig
from jaxsft.model.prompts import prefix_kv
from jaxsft.model.safetensors_io import TensorIndex, TensorSpec, _write_file

TENSOR = "prompt_embeddings"
PEFT_TYPES = {"prefix_tuning": "PREFIX_TUNING", "prompt_tuning": "PROMPT_TUNING"}


def _prompt_embeddings(cfg: PeftConfig, trainable: dict, dims) -> np.ndarray:
    layers, _, _, kv_heads, head_dim = dims
    if cfg.method == "prompt_tuning":
        return np.asarray(jax.device_get(trainable["prompt"]), np.float32)
    kv = prefix_kv(cfg, jax.device_get(trainable), layers, kv_heads, head_dim)
    k_WxLxKxH, v_WxLxKxH = (np.asarray(kv[x], np.float32).swapaxes(0, 1) for x in ("k", "v"))
    return np.stack([k_WxLxKxH, v_WxLxKxH], axis=2).reshape(cfg.num_virtual_tokens, -1)


def save(cfg: PeftConfig, trainable: dict, out_dir: str | Path, dims, base_model: str = "") -> list[str]:
    """adapter_config.json + adapter_model.safetensors (float32) for `PeftModel.from_pretrained`."""
    layers, d_model, n_heads, kv_heads, head_dim = dims
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensor = np.ascontiguousarray(_prompt_embeddings(cfg, trainable, dims))
    _write_file(
        out_dir / "adapter_model.safetensors",
        [TensorSpec(TENSOR, tensor.shape, np.dtype(np.float32))],
        {TENSOR: tensor}.get,
    )
    config = {
        "peft_type": PEFT_TYPES[cfg.method],
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "num_layers": layers,
        "inference_mode": True,
        "base_model_name_or_path": base_model or None,
    }
    if cfg.method == "prefix_tuning":
        config |= {
            "token_dim": kv_heads * head_dim,
            "num_attention_heads": kv_heads,
            "encoder_hidden_size": cfg.prefix_hidden or kv_heads * head_dim,
            "prefix_projection": False,
        }
    else:
        config |= {"token_dim": d_model, "num_attention_heads": n_heads, "prompt_tuning_init": "RANDOM"}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["adapter_config.json", "adapter_model.safetensors"]


def load(adapter_dir: str | Path, params) -> tuple[dict, dict]:
    """({method, num_virtual_tokens}, trainable) of a HF PEFT prefix- or prompt-tuning directory."""
    adapter_dir = Path(adapter_dir)
    try:
        found = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{adapter_dir}: no readable adapter_config.json ({e})") from None
    methods = {v: k for k, v in PEFT_TYPES.items()}
    if found.get("peft_type") not in methods or found.get("num_transformer_submodules", 1) != 1:
        raise ConfigError(f"{adapter_dir}: not a causal-LM prefix or prompt tuning adapter ({found.get('peft_type')})")
    if not isinstance(found.get("num_virtual_tokens"), int):
        raise ConfigError(f"{adapter_dir}: adapter_config.json has no integer num_virtual_tokens")
    method, w = methods[found["peft_type"]], found["num_virtual_tokens"]
    layers, d_model, kv_heads, head_dim = params["blocks"]["attn"]["k_proj"].shape
    try:
        tensor = TensorIndex(adapter_dir).read(TENSOR).astype(np.float32)
    except (KeyError, FileNotFoundError) as e:
        raise ConfigError(f"{adapter_dir}: no {TENSOR} tensor in adapter_model.safetensors ({e})") from None
    expected = (w, d_model) if method == "prompt_tuning" else (w, layers * 2 * kv_heads * head_dim)
    if tensor.shape != expected:
        raise ConfigError(f"{adapter_dir}: {TENSOR} has shape {tensor.shape}, this model needs {expected}")
    fields = {"method": method, "num_virtual_tokens": w}
    if method == "prompt_tuning":
        return fields, {"prompt": jnp.asarray(tensor)}
    kv_WxLx2xKxH = tensor.reshape(w, layers, 2, kv_heads, head_dim)
    return fields, {
        "prefix": {
            "k": jnp.asarray(kv_WxLx2xKxH[:, :, 0].swapaxes(0, 1)),
            "v": jnp.asarray(kv_WxLx2xKxH[:, :, 1].swapaxes(0, 1)),
        }
    }
