"""Pieces the benches share: the Llama sizes of issue 13, random packed batches, a matmul peak.

Not a benchmark itself. Imported by the scripts beside it (`python bench/X.py` puts bench/
on the import path).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import Config, DataConfig, ModelConfig, TrainConfig
from jaxsft.model import blas

# name: (model, vocab, rows, length). Head dim 64 everywhere; untied head (HF's default for Llama).
SIZES = {
    "S": (ModelConfig(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, head_dim=64, d_ff=688), 8192, 8, 512),
    "M": (ModelConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1376), 16384, 8, 512),
    "L": (ModelConfig(d_model=1024, n_layers=12, n_heads=16, n_kv_heads=8, head_dim=64, d_ff=2752), 32000, 4, 1024),
}


def size_config(name: str, **model_overrides) -> tuple[Config, int]:
    """(config, vocab) of a named size: float32, full fine-tuning, AdamW, `xla` attention."""
    model, vocab, rows, length = SIZES[name]
    model = dataclasses.replace(model, vocab_size=vocab, attention="xla", **model_overrides)
    cfg = Config(model=model, data=DataConfig(max_length=length), train=TrainConfig(steps=1000, global_batch_size=rows))
    return cfg, vocab


def sft_mask(rng: np.random.Generator, rows: int, length: int, trained: float) -> np.ndarray:
    """Loss weights of packed chat rows: untrained prompt spans (16-96 tokens), each followed
    by a trained answer sized so that about `trained` of the tokens are trained (1: all)."""
    if trained >= 1:
        return np.ones((rows, length), np.float32)
    weights = np.zeros((rows, length), np.float32)
    for row in weights:
        pos = 0
        while pos < length:
            prompt = int(rng.integers(16, 97))
            answer = round(prompt * trained / (1 - trained))
            row[pos + prompt : pos + prompt + answer] = 1.0
            pos += prompt + answer
    return weights


def random_batch(
    rng: np.random.Generator, rows: int, length: int, vocab: int, trained: float = 1.0
) -> dict[str, np.ndarray]:
    """One packed batch of random tokens, one segment per row: every target trained, or a
    share `trained` of them under an SFT-like mask (`sft_mask`)."""
    tokens = rng.integers(1, vocab, (rows, length + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_weights": sft_mask(rng, rows, length, trained),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
    }


def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall time of `fn()` (which must block until its work is done) after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def jax_matmul_flops(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured FLOP/s of one jitted [m, k] @ [k, n] matmul on the default device, done as the
    step does it (jaxsft/model/blas.py: the BLAS for float32 on a single CPU device)."""
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    matmul = jax.jit(lambda a, b: blas.matmul(a, b))
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    return 2 * m * k * n / seconds


def matmul_shapes(cfg: Config, vocab: int) -> list[tuple[int, int, int]]:
    """The step's two dominant matmul shapes: the MLP's and the output head's."""
    tokens = cfg.train.global_batch_size * cfg.data.max_length
    return [(tokens, cfg.model.d_model, cfg.model.d_ff), (tokens, cfg.model.d_model, vocab)]
