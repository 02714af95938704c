"""The model's own mean log-likelihood of sampled responses, by teacher forcing.

Contract:
    mean_logprobs(graphdef, params, prompts, responses, rows) -> list[float | None]
        prompts[i], responses[i]: token ids; the mean over the response's tokens of
        log p(token | everything before it) at temperature 1; None for an empty response.

Each row is prompt + response, right-padded to a multiple of 32 tokens (one compilation per
bucket) in batches of `rows` (a short last batch is padded with empty rows). The response
is scored as generated (its ids, not a re-tokenisation of its text), without the stop id,
so the score is that of the answer's content. Rows are one segment each: padding is
segment 0 and never attended to.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

_BUCKET = 32


@functools.partial(jax.jit, static_argnums=0)
def token_logprobs(graphdef, params, tokens_BxT, lengths_B):
    """log p(tokens[t + 1] | tokens[:t + 1]) for t < T - 1: [B, T - 1] float32."""
    model = nnx.merge(graphdef, params)
    inputs_BxS, targets_BxS = tokens_BxT[:, :-1], tokens_BxT[:, 1:]
    positions_BxS = jnp.broadcast_to(jnp.arange(inputs_BxS.shape[1], dtype=jnp.int32), inputs_BxS.shape)
    segment_ids_BxS = (positions_BxS < lengths_B[:, None]).astype(jnp.int32)
    logits_BxSxV = model.logits(model.hidden_states(inputs_BxS, positions_BxS, segment_ids_BxS))
    logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_BxSxV, targets_BxS[..., None], axis=-1)[..., 0]


def mean_logprobs(
    graphdef, params, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], rows: int
) -> list[float | None]:
    out: list[float | None] = []
    for start in range(0, len(prompts), rows):
        pairs = list(zip(prompts[start : start + rows], responses[start : start + rows]))
        width = -(-max(len(p) + len(r) for p, r in pairs) // _BUCKET) * _BUCKET
        tokens_BxT = np.zeros((rows, width + 1), np.int32)
        lengths_B = np.zeros((rows,), np.int32)
        for row, (p, r) in enumerate(pairs):
            tokens_BxT[row, : len(p) + len(r)] = [*p, *r]
            lengths_B[row] = len(p) + len(r)
        logp_BxS = np.asarray(token_logprobs(graphdef, params, tokens_BxT, lengths_B))
        for row, (p, r) in enumerate(pairs):
            # Response token j sits at index len(p) + j, predicted from position len(p) + j - 1.
            scores = logp_BxS[row, len(p) - 1 : len(p) + len(r) - 1]
            out.append(float(np.mean(scores, dtype=np.float64)) if len(r) else None)
    return out
