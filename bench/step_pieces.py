"""Where a train step's time goes: its pieces compiled and timed alone, forward + backward.

    python bench/step_pieces.py [--size S] [--rounds 5]

Pieces (each under `jax.jit`, timed in alternating rounds, medians): the whole step
(program.build), one layer's attention, one block, the output head + cross-entropy (logits
path and `loss_chunk` 1024), the embedding lookup's gradient, and the optimizer update.
Pieces overlap nothing and miss XLA's fusion across them, so they need not add up to the
step; they say which piece to work on (bench/NOTES.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from jaxsft import hostmem

if __name__ == "__main__":  # run as a script (not imported by a test): the malloc `jaxsft train` runs with
    hostmem.reexec_with_tunables()  # jaxsft/hostmem.py

import jax
import jax.numpy as jnp
import numpy as np
from common import random_batch, size_config
from flax import nnx

from jaxsft.model.attention import attention
from jaxsft.model.layers import Block, rope_tables
from jaxsft.train import program as program_lib
from jaxsft.train import sharding
from jaxsft.train import state as state_lib
from jaxsft.train.loss import chunked_cross_entropy_sum, cross_entropy_sum


def _timed(fn, *args):
    """fn jitted; returns a zero-argument callable that runs it once and blocks."""
    jitted = jax.jit(fn)
    return lambda: jax.block_until_ready(jitted(*args))


def pieces(size: str) -> dict:
    cfg, vocab = size_config(size)
    m = cfg.model
    rows, length = cfg.train.global_batch_size, cfg.data.max_length
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32))  # noqa: E731
    batch = random_batch(rng, rows, length, vocab)
    out = {}

    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    program = program_lib.build(cfg, vocab, mesh)
    holder = list(state_lib.initial_state(cfg, vocab, program.optimizer, program.plan))
    step = program.compile_train()
    gbatch = sharding.global_batch(batch, program.batch_sharding)

    def run_step():
        holder[0], metrics = step(holder[0], gbatch, *holder[1])
        jax.block_until_ready(metrics)

    out["whole step"] = run_step

    q, k, v = (
        normal(rows, length, m.n_heads, m.head_dim),
        normal(rows, length, m.n_kv_heads, m.head_dim),
        normal(rows, length, m.n_kv_heads, m.head_dim),
    )
    seg = jnp.asarray(batch["segment_ids"])
    attn_loss = lambda q, k, v: jnp.sum(attention(q, k, v, seg, implementation="xla"))  # noqa: E731
    out["attention x1 (fwd+bwd)"] = _timed(jax.grad(attn_loss, argnums=(0, 1, 2)), q, k, v)

    block_graph, block_params = nnx.split(Block(m, rngs=nnx.Rngs(0)))
    x = normal(rows, length, m.d_model)
    cos, sin = rope_tables(jnp.asarray(batch["positions"]), m.head_dim, m.rope_theta)

    def block_loss(p, x):
        attend = lambda q, k, v: (attention(q, k, v, seg, implementation="xla"), None)  # noqa: E731
        return jnp.sum(nnx.merge(block_graph, p)(x, cos, sin, attend)[0])

    out["block x1 (fwd+bwd)"] = _timed(jax.grad(block_loss, argnums=(0, 1)), block_params, x)

    head = normal(m.d_model, vocab) * 0.02
    targets, weights = jnp.asarray(batch["targets"]), jnp.asarray(batch["loss_weights"])

    def head_loss(h, w):
        logits = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32)
        return cross_entropy_sum(logits, targets, weights)[0]

    out["head + CE (fwd+bwd)"] = _timed(jax.grad(head_loss, argnums=(0, 1)), x, head)
    chunked = lambda h, w: chunked_cross_entropy_sum(h, w, targets, weights, 1024)[0]  # noqa: E731
    out["head + CE, chunk 1024"] = _timed(jax.grad(chunked, argnums=(0, 1)), x, head)
    head_only = lambda h, w: jnp.sum(jnp.einsum("btd,dv->btv", h, w))  # noqa: E731
    out["head matmul only (fwd+bwd)"] = _timed(jax.grad(head_only, argnums=(0, 1)), x, head)

    table = normal(vocab, m.d_model)
    tokens = jnp.asarray(batch["inputs"])
    embed_loss = lambda e, t: jnp.sum(jnp.take(e, t, axis=0) * x)  # noqa: E731
    out["embedding (fwd+bwd)"] = _timed(jax.grad(embed_loss), table, tokens)

    params, opt_state = jax.tree.map(jnp.copy, (holder[0]["params"], holder[0]["opt_state"]))  # step donates its own
    grads = jax.tree.map(jnp.ones_like, params)
    update = lambda g, s, p: program.optimizer.update(g, s, p)  # noqa: E731
    out["optimizer update"] = _timed(update, grads, opt_state, params)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="S")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    fns = pieces(args.size)
    for fn in fns.values():
        fn()  # compile + warm up
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    print(f"size {args.size}; load average {os.getloadavg()[0]:.1f}; medians of {args.rounds} alternating rounds")
    for k, t in times.items():
        print(f"  {k:<30} {statistics.median(t) * 1e3:8.1f} ms  (min {min(t) * 1e3:.1f})")


if __name__ == "__main__":
    main()
