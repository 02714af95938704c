"""Hugging Face `config.json` <-> ModelConfig, for the supported architectures.

Job: read the shapes and variant numbers of a Hugging Face causal LM config into a
`ModelConfig` (one-line errors for anything unsupported), and write one back.

Contract:
    ARCHITECTURES: HF class name -> family
    from_hf(hf: dict, base: ModelConfig) -> (ModelConfig, vocab_size)
    to_hf(cfg: ModelConfig, vocab_size, dtype) -> dict (a config.json)

Only numbers and flags are read from config.json; nothing in it is executed.
"""

from __future__ import annotations

from jaxsft.config import MODEL_TRAINING_FIELDS, ConfigError, ModelConfig, RopeScaling
from jaxsft.model.families import resolve

ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}
_ARCH_OF = {family: arch for arch, family in ARCHITECTURES.items()}


def _family(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    known = [a for a in archs if a in ARCHITECTURES]
    if not known:
        raise ConfigError(
            f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[known[0]]


def _rope(hf: dict, where: str) -> tuple[float, RopeScaling]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, RopeScaling()
    if kind != "llama3":
        raise ConfigError(f"{where}: rope type {kind!r} is not supported; supported: default, llama3")
    return theta, RopeScaling(
        type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position=int(params["original_max_position_embeddings"]),
    )


def _check_unsupported(hf: dict, family: str, where: str) -> None:
    flags = {"attention_bias": family != "qwen2", "mlp_bias": True, "use_sliding_window": True}
    for key, unsupported in flags.items():
        if unsupported and hf.get(key):
            raise ConfigError(f"{where}: {key}=true is not supported for {family}")
    if family == "gemma2" and hf.get("layer_types"):
        expected = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hf["num_hidden_layers"])]
        if list(hf["layer_types"]) != expected:
            raise ConfigError(f"{where}: layer_types other than alternating sliding/full are not supported")


def from_hf(hf: dict, base: ModelConfig = ModelConfig(), where: str = "config.json") -> tuple[ModelConfig, int]:
    """The checkpoint's shapes; training fields (dtype, remat, ...) come from `base`."""
    family = _family(hf, where)
    _check_unsupported(hf, family, where)
    heads = int(hf["num_attention_heads"])
    theta, scaling = _rope(hf, where)
    gemma2 = family == "gemma2"
    window = hf.get("sliding_window") if family in ("mistral", "gemma2") else None
    cfg = ModelConfig(
        family=family,
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        d_ff=int(hf["intermediate_size"]),
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", family in ("gemma", "gemma2"))),
        sliding_window=int(window or 0),
        attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0) if gemma2 else 0.0,
        final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0) if gemma2 else 0.0,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 0.0) if gemma2 else 0.0,
        **{k: getattr(base, k) for k in MODEL_TRAINING_FIELDS},  # kept from the run's config
    )
    return cfg, cfg.vocab_size


def to_hf(cfg: ModelConfig, vocab_size: int, dtype: str) -> dict:
    cfg = resolve(cfg)
    gemma = cfg.family in ("gemma", "gemma2")
    out = {
        "architectures": [_ARCH_OF[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "gelu_pytorch_tanh" if gemma else "silu",
        "max_position_embeddings": 8192,
        "attention_bias": cfg.family == "qwen2",
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if gemma:
        out["hidden_activation"] = "gelu_pytorch_tanh"
    if cfg.rope_scaling.type == "llama3":
        s = cfg.rope_scaling
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position,
        }
        out["max_position_embeddings"] = int(s.original_max_position * s.factor)
    if cfg.family in ("mistral", "gemma2"):
        out["sliding_window"] = cfg.sliding_window or None
    if cfg.family == "gemma2":
        out.update(
            attn_logit_softcapping=cfg.attn_logit_softcap or None,
            final_logit_softcapping=cfg.final_logit_softcap or None,
            query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),
        )
    if cfg.family in ("qwen2", "qwen3"):
        out["use_sliding_window"] = False
    return out
