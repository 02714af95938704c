"""Architecture variants and named presets.

Job: say how each supported family differs from the Llama baseline, and give the
shapes of the common published sizes.

Contract:
    variant(family) -> Variant          structural switches read by the layers
    PRESETS: name -> ModelConfig         shapes only (no weights)
    resolve(cfg) -> ModelConfig          applies cfg.preset (fields left at default take it)
    layer_windows(cfg) -> tuple[int]     sliding window of each layer (0 = full attention)

A family is structure (which norms, which activation, which extra params); numbers that
a checkpoint states (sliding window size, soft-caps, rope scaling) are config fields, so
one implementation serves every size of every family.
"""

from __future__ import annotations

import dataclasses

from jaxsft.config import ConfigError, ModelConfig, RopeScaling


@dataclasses.dataclass(frozen=True)
class Variant:
    activation: str = "silu"  # silu | gelu_tanh (the MLP's gate activation)
    norm_offset: float = 0.0  # gemma: RMSNorm multiplies by (1 + w), w initialised to 0
    embed_scale: bool = False  # gemma: embeddings times sqrt(d_model)
    post_norms: bool = False  # gemma2: norms after attention and MLP as well as before
    qkv_bias: bool = False  # qwen2: bias on q, k and v
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim of q and k, before rope
    window_every_other: bool = False  # gemma2: sliding window on even layers only


VARIANTS = {
    "llama": Variant(),
    "mistral": Variant(),
    "qwen2": Variant(qkv_bias=True),
    "qwen3": Variant(qk_norm=True),
    "gemma": Variant(activation="gelu_tanh", norm_offset=1.0, embed_scale=True),
    "gemma2": Variant(
        activation="gelu_tanh", norm_offset=1.0, embed_scale=True, post_norms=True, window_every_other=True
    ),
}


def variant(family: str) -> Variant:
    if family not in VARIANTS:
        raise ConfigError(f"model.family={family!r}: expected one of {', '.join(VARIANTS)}")
    return VARIANTS[family]


def layer_windows(cfg: ModelConfig) -> tuple[int, ...]:
    """Per-layer sliding window (0 = full). Passed through the layer scan as data."""
    if not variant(cfg.family).window_every_other:
        return (cfg.sliding_window,) * cfg.n_layers
    return tuple(cfg.sliding_window if i % 2 == 0 else 0 for i in range(cfg.n_layers))


def _llama3(factor: float) -> RopeScaling:
    return RopeScaling(
        type="llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192
    )


def _preset(family, vocab, d, layers, heads, kv, head_dim, ff, **kw) -> ModelConfig:
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        d_model=d,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        head_dim=head_dim,
        d_ff=ff,
        **kw,
    )


_GEMMA2 = dict(
    norm_eps=1e-6,
    tie_embeddings=True,
    sliding_window=4096,
    attn_logit_softcap=50.0,
    final_logit_softcap=30.0,
    query_pre_attn_scalar=256.0,
)
_QWEN = dict(rope_theta=1e6, norm_eps=1e-6)

PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset("llama", 32000, 4096, 32, 32, 32, 128, 11008),
    "llama-3-8b": _preset("llama", 128256, 4096, 32, 32, 8, 128, 14336, rope_theta=5e5),
    "llama-3.1-8b": _preset("llama", 128256, 4096, 32, 32, 8, 128, 14336, rope_theta=5e5, rope_scaling=_llama3(8.0)),
    "llama-3.2-1b": _preset(
        "llama", 128256, 2048, 16, 32, 8, 64, 8192, rope_theta=5e5, rope_scaling=_llama3(32.0), tie_embeddings=True
    ),
    "llama-3.2-3b": _preset(
        "llama", 128256, 3072, 28, 24, 8, 128, 8192, rope_theta=5e5, rope_scaling=_llama3(32.0), tie_embeddings=True
    ),
    "mistral-7b": _preset("mistral", 32000, 4096, 32, 32, 8, 128, 14336, sliding_window=4096),
    "qwen2.5-0.5b": _preset("qwen2", 151936, 896, 24, 14, 2, 64, 4864, tie_embeddings=True, **_QWEN),
    "qwen2.5-7b": _preset("qwen2", 152064, 3584, 28, 28, 4, 128, 18944, **_QWEN),
    "qwen3-8b": _preset("qwen3", 151936, 4096, 36, 32, 8, 128, 12288, **_QWEN),
    "gemma-2b": _preset("gemma", 256000, 2048, 18, 8, 1, 256, 16384, norm_eps=1e-6, tie_embeddings=True),
    "gemma-7b": _preset("gemma", 256000, 3072, 28, 16, 16, 256, 24576, norm_eps=1e-6, tie_embeddings=True),
    "gemma-2-2b": _preset("gemma2", 256000, 2304, 26, 8, 4, 256, 9216, **_GEMMA2),
    "gemma-2-9b": _preset("gemma2", 256000, 3584, 42, 16, 8, 256, 14336, **_GEMMA2),
}


def resolve(cfg: ModelConfig) -> ModelConfig:
    """cfg with its preset applied: every field still at its default takes the preset's value."""
    variant(cfg.family)
    if not cfg.preset:
        return cfg
    if cfg.preset not in PRESETS:
        raise ConfigError(f"model.preset={cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    default, preset = ModelConfig(), PRESETS[cfg.preset]
    changed = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(default, f.name)
    }
    changed.pop("preset")
    return dataclasses.replace(preset, **changed)
