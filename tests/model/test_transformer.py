"""Transformer: numbers against a plain float64 numpy Llama, packing, scan/remat, dtypes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.config import ModelConfig
from jaxsft.model.transformer import Transformer, param_count

VOCAB = 50
# init_std well above the default so logits are O(1) and a 1e-5 tolerance means something.
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, init_std=0.2)


def make(cfg=TINY, seed=0):
    return Transformer(cfg, VOCAB, rngs=nnx.Rngs(seed))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)


def forward(model, tokens, positions, segment_ids):
    """The trainer's way: jax.jit of a pure function over nnx.split state. The graphdef
    is static and hashable, so tests of one config and shape share one compilation."""
    return _forward(*nnx.split(model), tokens, positions, segment_ids)


def with_state(cfg, state):
    """A model of `cfg` holding the given params (no random init: its compiles are slow)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(cfg)))
    return nnx.merge(graphdef, state)


def single_row(length, seed=0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, size=(1, length)).astype(np.int32)
    positions = np.arange(length, dtype=np.int32)[None]
    return tokens, positions, np.ones((1, length), np.int32)


# ---------------------------------------------------------------------------- reference


def _rmsnorm(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
    """HF Llama: inv_freq over even indices, angles repeated over both halves, rotate_half."""
    h = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
    angles = positions[..., None] * inv_freq
    angles = np.concatenate([angles, angles], -1)[:, :, None]
    rotated = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
    return x * np.cos(angles) + rotated * np.sin(angles)


def _attention(q, k, v, segment_ids):
    n, h = q.shape[2], q.shape[3]
    k, v = np.repeat(k, n // k.shape[2], axis=2), np.repeat(v, n // v.shape[2], axis=2)
    scores = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(h)
    t = q.shape[1]
    allowed = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = np.where(allowed[:, None], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknh->bqnh", p, v)


def reference_logits(params, cfg, tokens, positions, segment_ids):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embedding"][tokens]
    for layer in range(cfg.n_layers):
        blk = jax.tree.map(lambda a: a[layer], p["blocks"])
        a = blk["attn"]
        h = _rmsnorm(x, blk["attn_norm"]["scale"], cfg.norm_eps)
        q = _rope(np.einsum("btd,dnh->btnh", h, a["q_proj"]), positions, cfg.rope_theta)
        k = _rope(np.einsum("btd,dkh->btkh", h, a["k_proj"]), positions, cfg.rope_theta)
        v = np.einsum("btd,dkh->btkh", h, a["v_proj"])
        x = x + np.einsum("btnh,nhd->btd", _attention(q, k, v, segment_ids), a["o_proj"])
        m = blk["mlp"]
        h = _rmsnorm(x, blk["mlp_norm"]["scale"], cfg.norm_eps)
        gate, up = h @ m["gate_proj"], h @ m["up_proj"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ m["down_proj"]
    x = _rmsnorm(x, p["final_norm"]["scale"], cfg.norm_eps)
    head = p["embedding"].T if cfg.tie_embeddings else p["lm_head"]
    return x @ head


def _packed_batch():
    rng = np.random.default_rng(1)
    lengths = (5, 7, 4)
    tokens = rng.integers(0, VOCAB, size=(2, 20)).astype(np.int32)
    segment_ids = np.zeros((2, 20), np.int32)
    positions = np.zeros((2, 20), np.int32)
    start = 0
    for seg, n in enumerate(lengths, 1):
        segment_ids[0, start : start + n] = seg
        positions[0, start : start + n] = np.arange(n)
        start += n
    segment_ids[1, :] = 1
    positions[1, :] = np.arange(20)
    return tokens, positions, segment_ids, lengths


@pytest.mark.parametrize("tie", [False, True])
def test_matches_numpy_reference(tie):
    cfg = dataclasses.replace(TINY, tie_embeddings=tie)
    model = make(cfg)
    tokens, positions, segment_ids, _ = _packed_batch()
    logits = forward(model, tokens, positions, segment_ids)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 20, VOCAB)
    ref = reference_logits(nnx.to_pure_dict(nnx.state(model)), cfg, tokens, positions, segment_ids)
    assert np.abs(ref).max() > 0.5  # the tolerance below is tight relative to the numbers
    valid = segment_ids > 0  # the reference leaves pads undefined (no -inf row guard)
    np.testing.assert_allclose(np.asarray(logits)[valid], ref[valid], rtol=1e-5, atol=1e-5)


def test_packing_is_invisible():
    model = make()
    tokens, positions, segment_ids, lengths = _packed_batch()
    packed = np.asarray(forward(model, tokens, positions, segment_ids))
    start = 0
    for n in lengths:
        alone = forward(
            model, tokens[:1, start : start + n], positions[:1, start : start + n], np.ones((1, n), np.int32)
        )
        np.testing.assert_allclose(packed[0, start : start + n], np.asarray(alone)[0], rtol=1e-5, atol=1e-5)
        start += n
    assert np.isfinite(packed[0, start:]).all()  # trailing padding


def test_all_padding_row_is_finite():
    tokens, positions, _ = single_row(8)
    logits = forward(make(), tokens, np.zeros_like(positions), np.zeros_like(tokens))
    assert np.isfinite(np.asarray(logits)).all()


@functools.cache
def _loss_and_grads(cfg):
    """Next-token cross-entropy through nnx.split/merge, as the trainer does it."""
    graphdef, state = nnx.split(make(cfg))
    tokens, positions, segment_ids, _ = _packed_batch()
    targets = np.roll(tokens, -1, axis=1)

    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(tokens, positions, segment_ids)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

    return jax.jit(jax.value_and_grad(loss_fn))(state)


def _assert_same(a, b, tol=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    np.testing.assert_allclose(loss_a, loss_b, rtol=tol)
    for ga, gb in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
        np.testing.assert_allclose(ga, gb, rtol=tol, atol=tol)


def test_scan_equals_python_loop():
    scanned = _loss_and_grads(TINY)
    looped = _loss_and_grads(dataclasses.replace(TINY, scan_layers=False))
    _assert_same(scanned, looped)
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(scanned[1]))


def _program_size(cfg):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(cfg)))
    tokens, positions, segment_ids, _ = _packed_batch()
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, positions, segment_ids))(state)
    return len(jaxpr.eqns)


def test_scanned_program_does_not_grow_with_depth():
    deep = dataclasses.replace(TINY, n_layers=8)
    assert _program_size(TINY) == _program_size(deep)
    loop, deep_loop = (dataclasses.replace(c, scan_layers=False) for c in (TINY, deep))
    assert _program_size(deep_loop) > _program_size(loop)


# The loop only differs in prevent_cse, so one remat policy covers it.
@pytest.mark.parametrize("remat, scan", [("full", True), ("dots_saveable", True), ("full", False)])
def test_remat_changes_nothing(remat, scan):
    base = _loss_and_grads(dataclasses.replace(TINY, scan_layers=scan))
    _assert_same(base, _loss_and_grads(dataclasses.replace(TINY, remat=remat, scan_layers=scan)))


def test_unknown_remat_is_rejected():
    with pytest.raises(ValueError, match="model.remat='some'"):
        make(dataclasses.replace(TINY, remat="some"))


def test_tied_head_is_the_embedding():
    cfg = dataclasses.replace(TINY, tie_embeddings=True)
    model = make(cfg)
    state = nnx.state(model)
    assert "lm_head" not in state and "lm_head" in nnx.state(make())
    assert param_count(cfg, VOCAB) == param_count(TINY, VOCAB) - TINY.d_model * VOCAB
    tokens, positions, segment_ids = single_row(12)
    unused = next(v for v in range(VOCAB) if v not in tokens)
    before = np.asarray(forward(model, tokens, positions, segment_ids))
    # Moving an embedding row the input never reads changes only that token's logit,
    # by exactly final_hidden . delta: the head reads the same array.
    delta = np.random.default_rng(2).normal(size=TINY.d_model).astype(np.float32)
    model.embedding[...] = model.embedding[...].at[unused].add(delta)
    after = np.asarray(forward(model, tokens, positions, segment_ids))
    others = np.arange(VOCAB) != unused
    np.testing.assert_allclose(after[..., others], before[..., others], rtol=1e-6, atol=1e-6)
    assert np.abs(after[..., unused] - before[..., unused]).min() > 1e-3


def test_every_param_has_logical_axes():
    logical = {"embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "layers"}
    state = nnx.state(nnx.eval_shape(lambda: make()), nnx.Param)
    specs = nnx.get_partition_spec(state)
    flat = nnx.to_flat_state(state)
    assert len(flat) == 3 + 9  # embedding, final norm, lm_head; 2 norms + 7 kernels per block
    for (path, var), (_, spec) in zip(flat, nnx.to_flat_state(specs)):
        names = tuple(spec.get_value())
        assert len(names) == var.ndim and set(names) <= logical, (path, names)
        assert (names[0] == "layers") == (path[0] == "blocks"), (path, names)
        if path[0] == "blocks":
            assert var.shape[0] == TINY.n_layers
    assert tuple(nnx.state(make()).blocks.attn.q_proj.out_sharding) == ("layers", "embed", "heads", "head_dim")


def test_param_count_matches_the_real_params():
    for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=True, n_heads=2, d_ff=48)):
        real = sum(x.size for x in jax.tree.leaves(nnx.state(make(cfg), nnx.Param)))
        d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
        per_layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * f + 2 * d
        expected = VOCAB * d * (1 if cfg.tie_embeddings else 2) + d + cfg.n_layers * per_layer
        assert param_count(cfg, VOCAB) == real == expected


def test_init_scales():
    state = nnx.state(make())
    np.testing.assert_allclose(np.std(state.embedding[...]), TINY.init_std, rtol=0.1)
    # Residual outputs: init_std / sqrt(2 * n_layers) = init_std / 2 with two layers.
    np.testing.assert_allclose(np.std(state.blocks.mlp.down_proj[...]), TINY.init_std / 2, rtol=0.1)
    np.testing.assert_allclose(np.std(state.blocks.attn.o_proj[...]), TINY.init_std / 2, rtol=0.1)
    np.testing.assert_array_equal(state.blocks.attn_norm.scale[...], 1.0)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bfloat16_close_to_float32(param_dtype):
    tokens, positions, segment_ids, _ = _packed_batch()
    model = make()
    ref = np.asarray(forward(model, tokens, positions, segment_ids))
    cfg = dataclasses.replace(TINY, dtype="bfloat16", param_dtype=param_dtype)
    abstract = nnx.state(nnx.eval_shape(lambda: make(cfg)))
    assert all(x.dtype == jnp.dtype(param_dtype) for x in jax.tree.leaves(abstract))
    # The same weights (rounded when stored in bfloat16), so only compute precision differs.
    state = jax.tree.map(lambda a: a.astype(param_dtype), nnx.state(model))
    logits = forward(with_state(cfg, state), tokens, positions, segment_ids)
    assert logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - ref)
    assert np.isfinite(err).all() and err.max() < 0.05 * np.abs(ref).max(), (err.max(), np.abs(ref).max())
