"""Prefix tuning (Li & Liang 2021) and prompt tuning (Lester et al. 2021): virtual tokens first.

Job: the params, shardings, counts and per-layer key/value prefixes of `model.peft.method`
`prefix_tuning` and `prompt_tuning`; their Hugging Face PEFT files are in hf_prompt.py.

Design
------
- Both methods put W = `num_virtual_tokens` virtual tokens before every example, as Hugging
  Face PEFT does: in every layer every query also sees W prefix keys/values, and the real
  tokens' positions start at W (a token at position p of its segment is rotated as W + p).
  The prefix is the same for every example, hence for every segment of a packed row: each
  segment sees it, and a packed row gives exactly the losses of its examples alone.
- Prefix tuning learns the keys/values themselves, `{"prefix": {"k": [L, W, K, H], "v": ...}}`,
  used as they are (PEFT hands them to the model as past_key_values: no rotary embedding,
  no k-norm). With `prefix_projection` the params are PEFT's PrefixEncoder instead: an
  embedding [W, C] (C = K * H) and a tanh MLP C -> `prefix_hidden` -> L * 2 * C whose output,
  per virtual token laid out [L, 2 (k, v), K, H], is the prefix. Export writes that output.
- Prompt tuning learns W input vectors `{"prompt": [W, D]}`, as the first block reads them:
  PEFT prepends them to the scaled token embeddings, so for Gemma they carry the sqrt(D)
  embedding scale themselves (their init does). Under causal attention the
  virtual tokens' keys/values do not depend on what follows them, so each step runs them
  once through the frozen model (positions 0..W-1, `Transformer.virtual_kv`) and hands the
  (rotated) keys/values to the same prefix path. The loss sees the real tokens only.
- Init as PEFT's: prefix (and the projection's embedding) N(0, 1), projection layers torch's
  Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); prompts the embeddings of
  `prompt_init_text`'s ids repeated / cut to W (PEFT's TEXT init; ids without special
  tokens), else of W random vocabulary ids (PEFT's SAMPLE_VOCAB: real embeddings' scale),
  times the family's embedding scale (`embed_scale`).
- Shardings: prefixes [L, W, K, H] as ("layers", None, "kv_heads", "head_dim"), prompts [W, D]
  as (None, "embed"); the projection (small) is replicated. The frozen tree is the whole base.
- Sliding-window attention and the fused kernels (cudnn, splash, pallas_gpu) cannot take a
  prefix: `check` refuses them in one line.

Contract:
    enabled(cfg) -> bool
    shapes(cfg, n_layers, d_model, kv_heads, head_dim) -> {path: shape};  specs(cfg) -> PartitionSpec tree
    embed_scale(model_cfg) -> float     what the model multiplies token embeddings by (Gemma: sqrt(D))
    init(cfg, params, key, prompt_ids=(), embed_scale=1.0) -> trainable (float32; params may be abstract)
    prefix_kv(cfg, trainable, n_layers, kv_heads, head_dim) -> {"k", "v"} [L, W, K, H] float32 (prefix tuning)
    prefix(cfg, trainable, model) -> {"k", "v"} [L, W, K, H] in the compute dtype (either method)
    count(model_cfg) -> int;  check(model_cfg) -> None or ConfigError
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.model import paths
from jaxsft.model.families import layer_windows, resolve, variant

METHODS = ("prefix_tuning", "prompt_tuning")
# Attention implementations that take a prefix (attention.py); `auto` uses xla for it.
PREFIX_ATTENTION = ("xla", "auto")


def enabled(cfg: PeftConfig) -> bool:
    return cfg.method in METHODS


def _projection_width(cfg: PeftConfig, kv_width: int) -> int:
    return cfg.prefix_hidden or kv_width


def shapes(cfg: PeftConfig, n_layers: int, d_model: int, kv_heads: int, head_dim: int) -> dict:
    w = cfg.num_virtual_tokens
    if cfg.method == "prompt_tuning":
        return {"prompt": (w, d_model)}
    if not cfg.prefix_projection:
        return {"prefix/k": (n_layers, w, kv_heads, head_dim), "prefix/v": (n_layers, w, kv_heads, head_dim)}
    c = kv_heads * head_dim
    hidden = _projection_width(cfg, c)
    return {
        "prefix/embedding": (w, c),
        "prefix/w1": (c, hidden),
        "prefix/b1": (hidden,),
        "prefix/w2": (hidden, n_layers * 2 * c),
        "prefix/b2": (n_layers * 2 * c,),
    }


def specs(cfg: PeftConfig) -> dict:
    if cfg.method == "prompt_tuning":
        return {"prompt": P(None, "embed")}
    if not cfg.prefix_projection:
        kv = P("layers", None, "kv_heads", "head_dim")
        return {"prefix": {"k": kv, "v": kv}}
    return {"prefix": {k: P() for k in ("embedding", "w1", "b1", "w2", "b2")}}


def _dims(params) -> tuple[int, int, int, int]:
    """(L, D, K, H) of a model's params (arrays or abstract)."""
    layers, d_model, kv_heads, head_dim = params["blocks"]["attn"]["k_proj"].shape
    return layers, d_model, kv_heads, head_dim


def _prompt_ids(cfg: PeftConfig, vocab: int, key: jax.Array, prompt_ids: Sequence[int]) -> jax.Array:
    w = cfg.num_virtual_tokens
    if not prompt_ids:
        return jax.random.randint(key, (w,), 0, vocab)
    ids = list(prompt_ids) * math.ceil(w / len(prompt_ids))
    return jnp.asarray(ids[:w], jnp.int32)


def embed_scale(model_cfg: ModelConfig) -> float:
    m = resolve(model_cfg)
    return math.sqrt(m.d_model) if variant(m.family).embed_scale else 1.0


def init(cfg: PeftConfig, params, key: jax.Array, prompt_ids: Sequence[int] = (), embed_scale: float = 1.0) -> dict:
    """Fresh trainable params (float32) for the model of `params`; see the module docstring."""
    layers, d_model, kv_heads, head_dim = _dims(params)
    if cfg.method == "prompt_tuning":
        ids = _prompt_ids(cfg, params["embedding"].shape[0], key, prompt_ids)
        rows = jnp.take(params["embedding"], ids, axis=0).astype(jnp.float32)
        return {"prompt": rows * jnp.float32(embed_scale)}
    c = kv_heads * head_dim
    fan_in = {"w1": c, "b1": c, "w2": _projection_width(cfg, c), "b2": _projection_width(cfg, c)}
    flat = {}
    for k, (path, shape) in zip(jax.random.split(key, 5), shapes(cfg, layers, d_model, kv_heads, head_dim).items()):
        name = path.split("/")[-1]
        if name in fan_in:  # torch Linear: weight and bias ~ U(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(fan_in[name])
            flat[path] = jax.random.uniform(k, shape, jnp.float32, -bound, bound)
        else:
            flat[path] = jax.random.normal(k, shape, jnp.float32)
    return paths.unflatten(flat)


def prefix_kv(cfg: PeftConfig, trainable: dict, n_layers: int, kv_heads: int, head_dim: int) -> dict:
    """Prefix tuning's keys/values [L, W, K, H], float32: the params, or the projection's output."""
    t = trainable["prefix"]
    if "k" in t:
        return {"k": t["k"].astype(jnp.float32), "v": t["v"].astype(jnp.float32)}
    h_WxP = jnp.tanh(t["embedding"].astype(jnp.float32) @ t["w1"].astype(jnp.float32) + t["b1"])
    flat_WxO = h_WxP @ t["w2"].astype(jnp.float32) + t["b2"]
    kv_WxLx2xKxH = flat_WxO.reshape(flat_WxO.shape[0], n_layers, 2, kv_heads, head_dim)
    return {"k": kv_WxLx2xKxH[:, :, 0].swapaxes(0, 1), "v": kv_WxLx2xKxH[:, :, 1].swapaxes(0, 1)}


def prefix(cfg: PeftConfig, trainable: dict, model) -> dict:
    """The per-layer prefix the model attends to, in its compute dtype (`model`: the frozen base)."""
    m = model.cfg
    if cfg.method == "prompt_tuning":
        return model.virtual_kv(trainable["prompt"])
    kv = prefix_kv(cfg, trainable, m.n_layers, m.n_kv_heads, m.head_dim)
    return jax.tree.map(lambda x: x.astype(jnp.dtype(m.dtype)), kv)


def count(model_cfg: ModelConfig) -> int:
    m = resolve(model_cfg)
    return sum(math.prod(s) for s in shapes(m.peft, m.n_layers, m.d_model, m.n_kv_heads, m.head_dim).values())


def check(model_cfg: ModelConfig) -> None:
    """One ConfigError line when the (resolved) model cannot attend to a prefix."""
    m = resolve(model_cfg)
    method = m.peft.method
    if not enabled(m.peft):
        return
    if m.attention not in PREFIX_ATTENTION:
        raise ConfigError(
            f"model.peft.method={method} needs model.attention xla or auto: the {m.attention} kernel cannot "
            "take a prefix"
        )
    if any(layer_windows(m)):
        raise ConfigError(
            f"model.peft.method={method}: sliding-window attention (model.sliding_window={m.sliding_window}) "
            "cannot take a prefix yet; use lora, dora or adapter"
        )
