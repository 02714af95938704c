"""Chunked cross-entropy: the unchunked loss and gradients, without the full logits in memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.train.loss import chunked_cross_entropy_sum, cross_entropy_sum


def _reference(hidden_BxTxD, head_DxV, targets_BxT, weights_BxT, softcap=0.0):
    logits_BxTxV = jnp.einsum("btd,dv->btv", hidden_BxTxD, head_DxV, preferred_element_type=jnp.float32)
    if softcap:
        logits_BxTxV = softcap * jnp.tanh(logits_BxTxV / softcap)
    return cross_entropy_sum(logits_BxTxV, targets_BxT, weights_BxT)


def _inputs(batch, length, depth, vocab, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(k[0], (batch, length, depth), jnp.float32)
    head = jax.random.normal(k[1], (depth, vocab), jnp.float32) / np.sqrt(depth)
    targets = jax.random.randint(k[2], (batch, length), 0, vocab)
    weights = (jax.random.uniform(k[3], (batch, length)) < 0.6).astype(jnp.float32)
    return hidden, head, targets, weights


def _loss_and_grads(fn):
    """value_and_grad of the mean loss w.r.t. hidden and head, jitted."""

    def mean(hidden, head, targets, weights):
        total, weight = fn(hidden, head, targets, weights)
        return total / weight

    return jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))


@pytest.mark.parametrize("chunk, softcap", [(16, 0.0), (40, 0.0), (96, 30.0)], ids=["even", "padded", "softcap"])
def test_chunked_equals_unchunked_loss_and_gradients(chunk, softcap):
    args = _inputs(batch=3, length=32, depth=16, vocab=50)
    chunked = functools.partial(chunked_cross_entropy_sum, chunk=chunk, softcap=softcap)
    total, weight = chunked(*args)
    ref_total, ref_weight = _reference(*args, softcap=softcap)
    assert float(weight) == float(ref_weight) > 0
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)
    loss, (d_hidden, d_head) = _loss_and_grads(chunked)(*args)
    ref_loss, (ref_d_hidden, ref_d_head) = _loss_and_grads(functools.partial(_reference, softcap=softcap))(*args)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_d_hidden), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_d_head), rtol=1e-4, atol=1e-6)


def test_bf16_matmul_matches_unchunked_bf16():
    hidden, head, targets, weights = _inputs(batch=2, length=16, depth=32, vocab=64, seed=1)
    total, _ = chunked_cross_entropy_sum(hidden, head, targets, weights, chunk=8, dtype=jnp.bfloat16)
    ref_total, _ = _reference(hidden.astype(jnp.bfloat16), head.astype(jnp.bfloat16), targets, weights)
    np.testing.assert_allclose(float(total), float(ref_total), rtol=1e-5)


def _temp_bytes(fn, args) -> int:
    return _loss_and_grads(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_never_holds_the_full_logits():
    batch, length, depth, vocab = 2, 2048, 256, 32768  # 4096 tokens
    args = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _inputs(1, 1, 1, 1)]
    args = [
        jax.ShapeDtypeStruct(shape, x.dtype)
        for shape, x in zip([(batch, length, depth), (depth, vocab), (batch, length), (batch, length)], args)
    ]
    logits_bytes = batch * length * vocab * 4  # 512 MiB
    full = _temp_bytes(_reference, args)
    chunked = _temp_bytes(functools.partial(chunked_cross_entropy_sum, chunk=256), args)
    print(
        f"temp bytes: unchunked {full / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB, "
        f"one f32 logits tensor {logits_bytes / 2**20:.1f} MiB"
    )
    assert full >= logits_bytes  # the reference really materialises them
    # What remains is a few [chunk, V] blocks (logits, their gradient) and the [D, V] gradient
    # of the head carried through the scan: 72 MiB here against 1 GiB.
    chunk_logits_bytes, head_bytes = 256 * vocab * 4, depth * vocab * 4
    assert chunked <= 3 * chunk_logits_bytes + head_bytes
    assert chunked < logits_bytes / 4 and chunked < full / 8


def test_chunks_stay_on_their_devices_under_batch_sharding():
    """Strided chunks: each device computes its own tokens of every chunk, with no gather."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shapes = [
        ((16, 64, 32), jnp.float32, rows),
        ((32, 128), jnp.float32, whole),
        ((16, 64), jnp.int32, rows),
        ((16, 64), jnp.float32, rows),
    ]
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=s) for shape, dtype, s in shapes]
    with jax.set_mesh(mesh):  # as the train step traces it (program.py)
        hlo = _loss_and_grads(functools.partial(chunked_cross_entropy_sum, chunk=128)).lower(*args).compile().as_text()
    assert " all-gather(" not in hlo and " all-to-all(" not in hlo and " collective-permute(" not in hlo
    assert " all-reduce(" in hlo  # the loss and the head's gradient: the sums that must cross devices


@pytest.mark.parametrize(
    "chunk, row_1, row_2",
    [(16, 0, 20), (16, 0, 8), (16, 0, 16), (96, 16, 20)],
    ids=["whole-chunks", "one-piece", "three-pieces", "one-chunk"],
)
def test_untrained_tokens_are_never_computed(chunk, row_1, row_2):
    """On one device only the trained tokens run, in whole chunks and then in a block of
    pieces (a quarter chunk each), so no untrained token (prompt, padding) is computed when
    the trained ones fill whole pieces. Proof: NaN hidden states at every untrained position
    leave the loss and both gradients finite and equal to the reference over the trained
    tokens alone (a computed untrained token would carry NaN into the head's gradient)."""
    hidden, head, targets, _ = _inputs(batch=3, length=32, depth=16, vocab=50, seed=3)
    weights = np.zeros((3, 32), np.float32)
    # 12 + 20 = 32 trained tokens: exactly two chunks of 16; 12 + 8 = 20: one chunk, then a
    # block of one piece of 4; 12 + 16 = 28: one chunk, then a block of three pieces;
    # 12 + 16 + 20 = 48 of 96 tokens in one chunk: its first two pieces of 24
    weights[0, 20:] = 1.0
    weights[1, :row_1] = 1.5
    weights[2, :row_2] = 2.0
    hidden = np.asarray(hidden)
    poisoned = jnp.asarray(np.where(weights[..., None] > 0, hidden, np.nan))
    chunked = functools.partial(chunked_cross_entropy_sum, chunk=chunk)
    loss, (d_hidden, d_head) = _loss_and_grads(chunked)(poisoned, head, targets, jnp.asarray(weights))
    ref_loss, (ref_d_hidden, ref_d_head) = _loss_and_grads(_reference)(
        jnp.asarray(hidden), head, targets, jnp.asarray(weights)
    )
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_d_hidden), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_d_head), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(d_hidden)[weights == 0] == 0)


@pytest.mark.parametrize("trained", [0.0, 1.0], ids=["none", "all"])
def test_no_trained_token_and_every_token_trained(trained):
    """The loss sum and its gradients against the reference: all zero when no token is trained.
    48 tokens in chunks of 20: the last block (two pieces of 5) reads 2 rows past the end."""
    hidden, head, targets, _ = _inputs(batch=2, length=24, depth=16, vocab=50, seed=4)
    weights = jnp.full((2, 24), trained, jnp.float32)
    chunked = functools.partial(chunked_cross_entropy_sum, chunk=20)
    (total, (d_hidden, d_head)), (ref_total, (ref_d_hidden, ref_d_head)) = (
        jax.value_and_grad(lambda h, w, fn=fn: fn(h, w, targets, weights)[0], argnums=(0, 1))(hidden, head)
        for fn in (chunked, _reference)
    )
    assert float(total) == pytest.approx(float(ref_total), rel=1e-5)
    assert (float(total) == 0) == (trained == 0)
    np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_d_head), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_d_hidden), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("axes", [("data", "fsdp"), ("data", "tensor")])
def test_sharded_chunks_equal_the_reference(axes):
    """Under an 8-device mesh, rows split and the head split over fsdp (its embedding) or over
    tensor (its vocabulary), the strided chunks give the reference's loss and gradients."""
    mesh = jax.make_mesh((2, 4), axes, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    split = lambda *spec: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))  # noqa: E731
    rows = split(("data", "fsdp") if "fsdp" in axes else "data")
    head = split("fsdp") if "fsdp" in axes else split(None, "tensor")
    args = _inputs(batch=8, length=64, depth=16, vocab=48, seed=5)
    placed = [jax.device_put(x, s) for x, s in zip(args, (rows, head, rows, rows))]
    with jax.set_mesh(mesh):  # as the train step traces it (program.py)
        loss, (d_hidden, d_head) = _loss_and_grads(functools.partial(chunked_cross_entropy_sum, chunk=128))(*placed)
    ref_loss, (ref_d_hidden, ref_d_head) = _loss_and_grads(_reference)(*args)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(d_hidden), np.asarray(ref_d_hidden), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d_head), np.asarray(ref_d_head), rtol=1e-4, atol=1e-6)


def test_one_gpu_holds_no_more_than_the_strided_chunks(monkeypatch):
    """Compiled for one H100 (compile-only device), bf16 as a GPU job runs: the one-device
    path (trained tokens only, gathered per block) takes no more temporary memory than the
    strided chunks that run every token. A `switch` inside the scan took 307 MiB against
    169-177 here: XLA copied the [D, V] float32 head gradient in and out of the conditional."""
    from jaxsft.train import aot, loss

    device = aot.gpu_topology("h100x1")[0][0]
    on_gpu = jax.sharding.SingleDeviceSharding(device)
    tokens, depth, vocab = 4096, 1024, 32768
    shapes = [((1, tokens, depth), jnp.bfloat16), ((depth, vocab), jnp.bfloat16), ((1, tokens), jnp.int32)]
    args = [jax.ShapeDtypeStruct(s, d, sharding=on_gpu) for s, d in shapes + [((1, tokens), jnp.float32)]]
    chunked = functools.partial(chunked_cross_entropy_sum, chunk=512, dtype=jnp.bfloat16)
    trained_only = _temp_bytes(chunked, args)
    monkeypatch.setattr(loss, "_one_device", lambda: False)
    strided = _temp_bytes(chunked, args)
    print(
        f"temp bytes on one H100: trained tokens only {trained_only / 2**20:.1f} MiB, strided {strided / 2**20:.1f} MiB"
    )
    assert trained_only <= strided


def test_boundary_blocks_run_only_inside_their_loops():
    """The block of 1-3 pieces after the whole chunks runs in a loop of 0 or 1 trips, one loop
    per size. If its body does not depend on the loop's index, XLA's loop-invariant code motion
    hoists it into the entry computation, where all three sizes then run on every step (rounds
    11-13; the L step of `bench/vs_hf.py` went 42.8 -> 35.6 s without it). Proof from the compiled
    program: no value of a block's logits shape ([k pieces, V]) is outside a loop body, and each is
    in the program."""
    hidden, head, targets, weights = _inputs(batch=2, length=48, depth=16, vocab=53, seed=5)
    chunked = functools.partial(chunked_cross_entropy_sum, chunk=16)  # pieces of 4 rows
    text = _loss_and_grads(chunked).lower(hidden, head, targets, weights).compile().as_text()
    computations = text.split("\n\n")
    entry = next(c for c in computations if c.lstrip().startswith("ENTRY"))
    for rows in (4, 8, 12):
        shape = f"f32[{rows},53]"
        assert shape not in entry, f"a {rows}-row block's logits are computed outside its loop"
        assert shape in text, f"no {rows}-row block in the program"
