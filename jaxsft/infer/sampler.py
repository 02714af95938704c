"""KV-cache generation: greedy, temperature, top-k and top-p, over batched prompts.

Job: continue a batch of prompts of different lengths, token by token, until each row
emits a stop id or reaches `max_new_tokens`.

Contract:
    Sampling(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=64, seed=0)   (temperature 0 = greedy)
    generate(graphdef, params, prompts, stop_ids, sampling) -> list[list[int]]  (stop id excluded)

How: prompts are right-padded into one [B, P] block; every slot's position is its index
in its own prompt and pad slots are marked invalid in the cache, so a row's queries see
exactly its own tokens. The prefill writes slots [0, P); new tokens go to slot P + t
with position len_b + t. Buffers have fixed sizes (P rounded up to a multiple of 32), and
prefill plus the whole decode loop (`lax.while_loop`, ending early once every row has
stopped) is one jit-compiled function, reused for every batch of the same bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.model.transformer import init_cache

_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    max_new_tokens: int = 64
    seed: int = 0


def sample_logits(logits_BxV: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row: argmax when greedy; else temperature, then top-k and top-p filtering."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / sampling.temperature
    if sampling.top_k > 0:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always the most likely token).
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        cutoff_Bx1 = jnp.min(jnp.where(before_BxV < sampling.top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _generate(graphdef, params, tokens_BxP, lengths_B, stop_ids, sampling: Sampling, seed):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = tokens_BxP.shape
    steps = sampling.max_new_tokens
    cache = init_cache(model.cfg, batch, prompt_len + steps, jnp.dtype(model.cfg.dtype))
    positions_BxP = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    valid_BxP = positions_BxP < lengths_B[:, None]
    logits_BxPxV, cache = model.decode(tokens_BxP, positions_BxP, valid_BxP, cache, 0)
    last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    out_BxU = jnp.zeros((batch, steps), jnp.int32)
    done_B = jnp.zeros((batch,), bool)
    key = jax.random.key(seed)  # traced: a new seed reuses the compilation

    def cond(carry):
        t, _, _, done_B, _, _ = carry
        return (t < steps) & ~jnp.all(done_B)

    def body(carry):
        t, last_BxV, cache, done_B, out_BxU, key = carry
        key, step_key = jax.random.split(key)
        token_B = sample_logits(last_BxV, step_key, sampling)
        out_BxU = out_BxU.at[:, t].set(jnp.where(done_B, -1, token_B))
        done_B = done_B | jnp.isin(token_B, stop_ids)
        logits_Bx1xV, cache = model.decode(
            token_B[:, None], (lengths_B + t)[:, None], ~done_B[:, None], cache, prompt_len + t
        )
        return t + 1, logits_Bx1xV[:, 0], cache, done_B, out_BxU, key

    carry = jax.lax.while_loop(cond, body, (0, last_BxV, cache, done_B, out_BxU, key))
    return carry[4]


def generate(
    graphdef, params, prompts: Sequence[Sequence[int]], stop_ids: Sequence[int], sampling: Sampling = Sampling()
) -> list[list[int]]:
    """New tokens of each prompt, up to (not including) its first stop id."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // _BUCKET) * _BUCKET
    tokens_BxP = np.zeros((len(prompts), width), np.int32)
    for row, prompt in zip(tokens_BxP, prompts):
        row[: len(prompt)] = prompt
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    stops = np.array(list(stop_ids) or [-1], np.int32)
    static = dataclasses.replace(sampling, seed=0)
    out_BxU = np.asarray(
        _generate(graphdef, params, tokens_BxP, lengths_B, stops, static, np.uint32(sampling.seed % 2**32))
    )
    results = []
    for row in out_BxU:
        tokens = [int(t) for t in row if t >= 0]
        cut = next((i for i, t in enumerate(tokens) if t in set(stops.tolist())), len(tokens))
        results.append(tokens[:cut])
    return results
