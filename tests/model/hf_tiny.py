"""Tiny random Hugging Face models (CPU torch, float32) and jaxsft loading helpers for tests."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.model import hf
from jaxsft.model.transformer import Transformer, abstract_params

VOCAB = 96
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)
# One config per variant worth testing; small windows and caps so that they matter.
CASES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3-rope-tied": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "mistral-window": ("MistralConfig", dict(sliding_window=3, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False)),
    "gemma": ("GemmaConfig", dict(hidden_activation="gelu_pytorch_tanh")),
    "gemma2": (
        "Gemma2Config",
        dict(
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=3,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            query_pre_attn_scalar=16,
        ),
    ),
}


def hf_model(case: str, seed: int = 0):
    import torch
    import transformers

    class_name, extra = CASES[case]
    config = getattr(transformers, class_name)(**{**_COMMON, **extra})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # every weight random (norms and biases included) so each one matters
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@functools.cache
def saved(case: str, root: str) -> Path:
    path = Path(root) / case
    hf_model(case).save_pretrained(path)
    return path


def replicated(cfg, vocab):
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_params(cfg, vocab))


def load(path):
    """(graphdef, params, cfg, vocab) of a HF directory, through the streaming importer."""
    cfg, vocab = hf.load_config(path)
    params = hf.load_params(path, cfg, vocab, replicated(cfg, vocab))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, vocab, rngs=nnx.Rngs(0))))
    return graphdef, params, cfg, vocab


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, positions, segment_ids):
    return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


def hf_logits(model, tokens, attention_mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens, np.int64)),
            attention_mask=torch.as_tensor(np.asarray(attention_mask, np.int64)),
        )
    return out.logits.float().numpy()
