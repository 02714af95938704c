"""The model under a mesh of 8 fake CPU devices: logical names in, same numbers out.

Mesh axis names appear here only, in the tests, standing in for the trainer's table.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.config import ModelConfig
from jaxsft.model.transformer import Transformer

VOCAB = 50
TINY = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, init_std=0.2)
DATA_RULES = (("batch", "data"),)
DATA_TENSOR_RULES = (
    ("batch", "data"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
)


def _batch(rows=8, length=16):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(rows, length)).astype(np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    segment_ids = np.ones((rows, length), np.int32)
    segment_ids[:, length // 2 :] = 2  # two packed examples per row
    positions[:, length // 2 :] -= length // 2
    return tokens, positions, segment_ids


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions, segment_ids)


def _reference():
    graphdef, state = nnx.split(Transformer(TINY, VOCAB, rngs=nnx.Rngs(0)))
    return graphdef, state, np.asarray(_forward(graphdef, state, *_batch()))


def test_constraints_are_a_no_op_without_rules_and_applied_with_them():
    graphdef, state = nnx.split(Transformer(TINY, VOCAB, rngs=nnx.Rngs(0)))
    plain = _forward.lower(graphdef, state, *_batch()).as_text()
    assert "sharding_constraint" not in plain
    with jax.set_mesh(_mesh((8,), ("data",))), nn.logical_axis_rules(DATA_RULES):
        constrained = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *_batch()).as_text()
    assert "sharding_constraint" in constrained


def test_batch_sharded_forward_equals_single_device():
    graphdef, state, expected = _reference()
    mesh = _mesh((8,), ("data",))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DATA_RULES):
        batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
        logits = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *batch)
    assert logits.sharding.spec[0] == "data"
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_trainer_flow_shards_params_by_logical_names():
    """eval_shape -> logical specs -> mesh shardings -> jitted init -> sharded forward."""
    _, _, expected = _reference()
    mesh = _mesh((4, 2), ("data", "tensor"))
    abstract = nnx.eval_shape(lambda: Transformer(TINY, VOCAB, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    specs = nnx.get_partition_spec(abstract_state)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, DATA_TENSOR_RULES)
    init = jax.jit(lambda: nnx.state(Transformer(TINY, VOCAB, rngs=nnx.Rngs(0))), out_shardings=shardings)
    state = init()
    assert state.blocks.attn.q_proj[...].sharding.spec == P(None, None, "tensor", None)
    assert state.blocks.mlp.down_proj[...].sharding.spec == P(None, "tensor", None)
    assert state.lm_head[...].sharding.spec == P(None, "tensor")
    with jax.set_mesh(mesh), nn.logical_axis_rules(DATA_TENSOR_RULES):
        batch = jax.device_put(_batch(), NamedSharding(mesh, P("data")))
        logits = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *batch)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)
    assert jnp.isfinite(logits).all()
