"""The CPU BLAS matmul (jaxsft/model/blas.py): float64 numbers, its gradients, where it is used.

`JAXSFT_CPU_MATMUL=blas` forces it in these tests: the suite runs with 8 CPU devices, where
`auto` keeps XLA's dot (a sharded program)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.config import Config, DataConfig, MeshConfig, OptimConfig, TrainConfig
from jaxsft.model import blas
from jaxsft.model.attention import attention, masked_attention, packed_causal_mask
from jaxsft.model.dense import dense
from jaxsft.train import mfu, sharding
from jaxsft.train import program as program_lib
from jaxsft.train import state as state_lib
from jaxsft.train.loss import chunked_cross_entropy_sum

from train_helpers import TINY_MODEL, make_batch


@pytest.fixture
def use_blas(monkeypatch):
    monkeypatch.setenv(blas.MODE_ENV, "blas")
    assert blas.available()  # this machine has a C++ compiler and numpy's OpenBLAS


def _op(x, trans):
    return x.T if trans else x


def _calls_blas(fn, *args) -> bool:
    """Whether fn lowers to the BLAS call; traced afresh (jit caches traces by function, and the
    mode is read when a function is traced)."""
    return blas.TARGET in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
# (m, k, n): one element, odd sizes, and 300 rows (split into pieces over XLA's threads)
@pytest.mark.parametrize("mkn", [(1, 1, 1), (3, 5, 7), (130, 70, 90), (300, 200, 257)])
def test_matmul_equals_float64(use_blas, trans_a, trans_b, mkn):
    m, k, n = mkn
    rng = np.random.default_rng(0)
    a = rng.normal(size=(k, m) if trans_a else (m, k))
    b = rng.normal(size=(n, k) if trans_b else (k, n))
    fn = lambda a, b: blas.matmul(a, b, trans_a, trans_b)
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    assert _calls_blas(fn, a32, b32)
    got = np.asarray(jax.jit(fn)(a32, b32))
    want = _op(a.astype(np.float32).astype(np.float64), trans_a) @ _op(b.astype(np.float32).astype(np.float64), trans_b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_matmul_gradients_equal_float64(use_blas, trans_a, trans_b):
    rng = np.random.default_rng(1)
    m, k, n = 70, 40, 90
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    g = rng.normal(size=(m, n)).astype(np.float32)
    _, vjp = jax.vjp(lambda a, b: blas.matmul(a, b, trans_a, trans_b), jnp.asarray(a), jnp.asarray(b))
    got_a, got_b = vjp(jnp.asarray(g))
    a64, b64, g64 = a.astype(np.float64), b.astype(np.float64), g.astype(np.float64)
    want_a = g64 @ _op(b64, trans_b).T  # d/d op(a), then back through op
    want_b = _op(a64, trans_a).T @ g64
    np.testing.assert_allclose(np.asarray(got_a), _op(want_a, trans_a), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got_b), _op(want_b, trans_b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("trans_a", "trans_b"), [(False, False), (False, True), (True, False), (True, True)])
def test_batched_matmul_and_its_gradients_equal_float64(use_blas, trans_a, trans_b):
    """Leading axes are a batch (attention's [B, K] heads), cut into pieces over XLA's threads."""
    rng = np.random.default_rng(4)
    z, m, k, n = (2, 3), 70, 48, 65
    a = rng.normal(size=(*z, k, m) if trans_a else (*z, m, k)).astype(np.float32)
    b = rng.normal(size=(*z, n, k) if trans_b else (*z, k, n)).astype(np.float32)
    g = rng.normal(size=(*z, m, n)).astype(np.float32)
    fn = lambda a, b: blas.matmul(a, b, trans_a, trans_b)
    assert _calls_blas(fn, a, b)
    y, vjp = jax.vjp(fn, jnp.asarray(a), jnp.asarray(b))
    got_a, got_b = vjp(jnp.asarray(g))
    op = lambda x, t: np.swapaxes(x, -1, -2) if t else x
    a64, b64, g64 = a.astype(np.float64), b.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(y), op(a64, trans_a) @ op(b64, trans_b), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(got_a), op(g64 @ np.swapaxes(op(b64, trans_b), -1, -2), trans_a), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        np.asarray(got_b), op(np.swapaxes(op(a64, trans_a), -1, -2) @ g64, trans_b), rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("softcap", [0.0, 20.0])
def test_fused_cpu_attention_equals_the_blocks(monkeypatch, softcap):
    """On the BLAS the xla attention is one fused call per direction (blas_sgemm.cc), its mask
    built inside: grouped heads (8 query, 2 kv), a prefix of 3 slots, a sliding window, segments
    that straddle its query blocks, padding, a soft-cap; values and gradients against the blocked
    xla form (held to float64 autodiff in tests/model/test_custom_gradients.py)."""
    b, t, n, kv, h = 2, 200, 8, 2, 16  # 4 blocks of 64, the last one short
    rng = np.random.default_rng(7)
    q, d_out = (jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(b, t, kv, h)), jnp.float32) for _ in range(2))
    prefix = tuple(jnp.asarray(rng.normal(size=(3, kv, h)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [70, 60, 50, 20]), np.repeat([1, 2], [130, 70])]))
    fn = lambda q, k, v, prefix: attention(q, k, v, segments, window=90, prefix=prefix, softcap=softcap)
    results = {}
    for mode in ("xla", "blas"):
        monkeypatch.setenv(blas.MODE_ENV, mode)
        text = jax.jit(lambda *a: jax.vjp(fn, *a)[1](d_out)).lower(q, k, v, prefix).as_text()
        assert (blas.ATTENTION_FWD in text and blas.ATTENTION_BWD in text) == (mode == "blas")
        y, vjp = jax.vjp(fn, q, k, v, prefix)
        results[mode] = (y, *vjp(d_out))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), results["xla"], results["blas"])


def test_attention_on_the_blas_equals_xla(monkeypatch):
    """Grouped heads (8 query, 2 kv), a soft-cap, two packed segments and padding; values and gradients
    (the xla path is held to float64 autodiff in tests/model/test_custom_gradients.py)."""
    rng = np.random.default_rng(5)
    q, k, v, d_out = (
        jnp.asarray(rng.normal(size=s), jnp.float32)
        for s in [(2, 40, 8, 16), (2, 40, 2, 16), (2, 40, 2, 16), (2, 40, 8, 16)]
    )
    segments = jnp.asarray(np.repeat([[1, 1, 2, 0], [1, 1, 1, 1]], 10, axis=1), jnp.int32)
    mask = packed_causal_mask(segments) & (segments[:, None, :] > 0)
    fn = lambda q, k, v: masked_attention(q, k, v, mask, scale=0.25, softcap=20.0)
    results = {}
    for mode in ("xla", "blas"):
        monkeypatch.setenv(blas.MODE_ENV, mode)
        assert _calls_blas(lambda q, k, v: jax.vjp(fn, q, k, v)[1](d_out), q, k, v) == (mode == "blas")
        y, vjp = jax.vjp(lambda q, k, v: fn(q, k, v), q, k, v)
        results[mode] = (y, *vjp(d_out))
    jax.tree.map(lambda x, b: np.testing.assert_allclose(x, b, rtol=1e-5, atol=1e-5), results["xla"], results["blas"])


def test_fused_cpu_attention_takes_a_traced_window_and_short_rows(monkeypatch):
    """The window is an operand (a per-layer scalar under the layer scan), 0 meaning none; a row
    shorter than one query block. Against the blocked xla form, values and gradients."""
    rng = np.random.default_rng(8)
    q, d_out = (jnp.asarray(rng.normal(size=(3, 37, 4, 8)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(3, 37, 4, 8)), jnp.float32) for _ in range(2))
    segments = jnp.asarray(np.stack([np.repeat([1, 2], [20, 17]), np.repeat([1, 0], [30, 7]), np.ones(37, int)]))
    windows = jnp.asarray([0, 5], jnp.int32)

    def fn(q, k, v):
        return jax.lax.map(lambda w: attention(q, k, v, segments, window=w), windows)

    results = {}
    for mode in ("xla", "blas"):
        monkeypatch.setenv(blas.MODE_ENV, mode)
        step = jax.jit(lambda q, k, v: jax.vjp(fn, q, k, v))
        assert (blas.ATTENTION_FWD in step.lower(q, k, v).as_text()) == (mode == "blas")
        y, vjp = jax.vjp(fn, q, k, v)
        results[mode] = (y, *vjp(jnp.stack([d_out, 2 * d_out])))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), results["xla"], results["blas"])


def test_a_pre_flight_for_another_platform_keeps_the_blocked_attention(use_blas):
    """The fused call is the CPU's: a program traced for a TPU or GPU target (`jaxsft compile`
    from a CPU host) keeps the blocked xla attention, even with the BLAS forced on."""
    from jaxsft.model import kernels

    q = jnp.ones((1, 128, 2, 8), jnp.float32)
    segments = jnp.ones((1, 128), jnp.int32)
    fn = jax.jit(jax.grad(lambda q: jnp.sum(attention(q, q, q, segments))))
    assert blas.ATTENTION_FWD in fn.lower(q).as_text()
    for platform in ("tpu", "gpu"):
        with kernels.compiling_for(platform):
            text = jax.jit(jax.grad(lambda q: jnp.sum(attention(q, q, q, segments)))).lower(q).as_text()
        assert blas.ATTENTION_FWD not in text and blas.ATTENTION_BWD not in text


def test_empty_contraction_and_empty_result(use_blas):
    zeros = np.asarray(jax.jit(blas.matmul)(jnp.ones((3, 0)), jnp.ones((0, 4))))
    np.testing.assert_array_equal(zeros, np.zeros((3, 4), np.float32))
    assert jax.jit(blas.matmul)(jnp.ones((0, 5)), jnp.ones((5, 4))).shape == (0, 4)


def test_dense_and_its_gradient_on_the_blas_equal_float64(use_blas):
    rng = np.random.default_rng(2)
    x, w, dy = rng.normal(size=(2, 65, 3, 4)), rng.normal(size=(3, 4, 33)), rng.normal(size=(2, 65, 33))
    fn = lambda x, w: dense(x, w, 2)
    args32 = [jnp.asarray(v, jnp.float32) for v in (x, w)]
    assert _calls_blas(lambda x, w: jax.vjp(fn, x, w)[1](jnp.ones((2, 65, 33)))[1], *args32)
    y, vjp = jax.vjp(fn, *args32)
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    x64, w64, dy64 = (np.asarray(v, np.float32).astype(np.float64) for v in (x, w, dy))
    np.testing.assert_allclose(np.asarray(y), np.einsum("btnh,nhd->btd", x64, w64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), np.einsum("btd,nhd->btnh", dy64, w64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), np.einsum("btnh,btd->nhd", x64, dy64), rtol=1e-5, atol=1e-4)


def test_chunked_loss_on_the_blas_equals_xla(monkeypatch):
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(2, 96, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 300)) * 0.3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (2, 96)), jnp.int32)
    weights = jnp.asarray(rng.random((2, 96)) < 0.7, jnp.float32)
    loss = lambda h, w: chunked_cross_entropy_sum(h, w, targets, weights, chunk=64, softcap=30.0)[0]
    results = {}
    for mode in ("xla", "blas"):
        monkeypatch.setenv(blas.MODE_ENV, mode)
        assert _calls_blas(jax.grad(loss, argnums=(0, 1)), hidden, head) == (mode == "blas")
        results[mode] = jax.value_and_grad(loss, argnums=(0, 1))(hidden, head)
    jax.tree.map(lambda x, b: np.testing.assert_allclose(x, b, rtol=1e-5, atol=1e-5), results["xla"], results["blas"])


def test_other_platforms_and_sharded_programs_keep_xla_dot(monkeypatch):
    a, b = jnp.ones((8, 4)), jnp.ones((4, 8))
    monkeypatch.setenv(blas.MODE_ENV, "blas")
    lowered = jax.jit(blas.matmul).trace(a, b).lower(lowering_platforms=("tpu",)).as_text()
    assert blas.TARGET not in lowered and "dot_general" in lowered  # e.g. `jaxsft compile` for a TPU
    monkeypatch.setenv(blas.MODE_ENV, "auto")
    assert jax.device_count() == 8 and not _calls_blas(blas.matmul, a, b)  # 8 devices: a sharded program
    monkeypatch.setenv(blas.MODE_ENV, "xla")
    assert not _calls_blas(blas.matmul, a, b)
    assert not _calls_blas(blas.matmul, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))  # float32 only
    monkeypatch.setenv(blas.MODE_ENV, "mkl")
    with pytest.raises(ValueError, match="JAXSFT_CPU_MATMUL='mkl': expected auto, blas or xla"):
        blas.matmul(a, b)


def test_without_a_compiler_it_warns_once_and_stays_on_xla(tmp_path):
    script = (
        "import jax.numpy as jnp, numpy as np\n"
        "from jaxsft.model import blas\n"
        "print(blas.available(), blas.in_use(jnp.ones((2, 2)), jnp.ones((2, 2))))\n"
        "print(np.asarray(blas.matmul(jnp.ones((2, 3)), jnp.ones((3, 2)))).tolist())\n"
    )
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "JAXSFT_CACHE": str(tmp_path), blas.MODE_ENV: "blas"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False False", "[[3.0, 3.0], [3.0, 3.0]]"]
    assert done.stderr.count("jaxsft: CPU matmuls stay on XLA's dot") == 1


@pytest.mark.slow
def test_a_compiler_without_march_native_still_builds_the_handler(tmp_path):
    """-march=native is tried first; a compiler that refuses it builds for the generic CPU."""
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -march=native ] && exit 1; done\nexec c++ "$@"\n')
    cxx.chmod(0o755)
    script = (
        "import jax.numpy as jnp, numpy as np\n"
        "from jaxsft.model import blas\n"
        "print(blas.available(), np.asarray(blas.matmul(jnp.ones((2, 3)), jnp.ones((3, 2)))).tolist())\n"
    )
    env = {**os.environ, "CXX": str(cxx), "JAXSFT_CACHE": str(tmp_path / "cache"), blas.MODE_ENV: "blas"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True [[3.0, 3.0], [3.0, 3.0]]"]
    assert len(list((tmp_path / "cache" / "blas").glob("*.so"))) == 1


@pytest.mark.slow
def test_train_step_on_the_blas_equals_xla(monkeypatch):
    """The real step (scan over layers, chunked loss, AdamW) on one device, both ways."""
    cfg = Config(
        model=TINY_MODEL,
        mesh=MeshConfig(data=1),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0),
        data=DataConfig(max_length=128),
        train=TrainConfig(steps=10, global_batch_size=4, loss_chunk=256, seed=0),
    )
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    results = {}
    for mode in ("xla", "blas"):
        monkeypatch.setenv(blas.MODE_ENV, mode)
        program = program_lib.build(cfg, 256, mesh)
        step = program.compile_train()
        assert (blas.TARGET in step.as_text()) == (mode == "blas")
        state, frozen = state_lib.initial_state(program.cfg, 256, program.optimizer, program.plan)
        batch = sharding.global_batch(make_batch(np.random.default_rng(0), 4, 128), program.batch_sharding)
        results[mode] = step(state, batch, *frozen)
    (a, metrics_a), (b, metrics_b) = results["xla"], results["blas"]
    np.testing.assert_allclose(float(metrics_a["loss"]), float(metrics_b["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics_a["grad_norm"]), float(metrics_b["grad_norm"]), rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-5), a["params"], b["params"])


def test_the_cpu_peak_measured_on_the_blas_is_cached_apart(monkeypatch):
    """A peak cached from XLA's dot must not stand for the BLAS's (MFU would read high or low)."""
    device = jax.devices()[0]
    monkeypatch.setenv(blas.MODE_ENV, "xla")
    xla_key = mfu._peak_key(device, "float32")
    monkeypatch.setenv(blas.MODE_ENV, "blas")
    assert mfu._peak_key(device, "float32") == xla_key + "|blas"
    assert not mfu._peak_key(device, "bfloat16").endswith("|blas")  # bfloat16 stays on XLA's dot
    assert _calls_blas(lambda x: blas.matmul(x, x), jnp.ones((4, 4)))  # what measured_matmul_flops times
