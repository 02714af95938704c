"""Fused attention kernels behind `attention(..., implementation=...)`: cudnn, splash, pallas_gpu.

Every wrapper keeps the contract of jaxsft.model.attention (packed segment ids with 0 = pad,
causal inside a segment, grouped-query heads in the repeat_kv order, query scale, optional
soft-cap and sliding window) and either computes exactly that or raises `Unsupported`: one
line naming model.attention and the missing feature. None silently computes something else.

- Platforms: cudnn needs a GPU. The Pallas kernels (splash: TPU, pallas_gpu: Triton) run
  natively on their platform and in the Pallas interpreter when jax.default_backend() is
  'cpu', which is how the tests compare them with xla (slow: meant for tests and debugging).
  Neither runs on the other accelerator. The pre-flight (`jaxsft compile` on a CPU host)
  traces under `compiling_for(target)`, so they lower natively for the target's devices.
- The kernel modules are imported inside the wrappers, so importing jaxsft never depends on
  which Pallas ops a jax build ships.
- Sliding window: the kernels that have one (splash's LocalMask, cuDNN's window length) bake
  it in at trace time, so they take a Python int. The transformer passes the per-layer window
  as a traced scalar under the layer scan; that is refused, not guessed.
- Multi-device: GSPMD cannot partition a Pallas kernel (Mosaic refuses outright), so under
  a mesh both run per device in a shard_map, split as the activated logical rules split
  `batch` and `heads`/`kv_heads`, with whole rows on every device (the sequence axis, if
  any, is gathered). cuDNN attention partitions itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from jaxsft.config import ConfigError

_LANES = 128  # splash tiles must be a multiple of this; pallas_gpu uses the same tile length


class Unsupported(ConfigError):
    """This kernel cannot compute the requested attention; the message is one line (a
    `ConfigError`, so the CLI prints it as one and exits 2)."""


_TARGET_PLATFORM = contextvars.ContextVar("jaxsft_target_platform", default=None)


def target_platform() -> str:
    """The platform the program being traced will run on: the pre-flight's target devices
    inside `compiling_for`, else JAX's default backend."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
    """Traces inside run for `platform` ('tpu', 'gpu'), whatever this host's backend: `auto`
    picks that platform's kernel and a Pallas kernel lowers natively (jaxsft compile on a CPU
    host). A kernel that needs the device itself to trace (cuDNN) still refuses, and `auto`
    falls back to xla. jit's caches do not see the target: trace a function under it that
    is not traced elsewhere (the pre-flight builds its program inside)."""
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def _refuse(implementation: str, feature: str) -> Unsupported:
    return Unsupported(f"model.attention={implementation} does not support {feature}; use model.attention=xla")


def _static_window(implementation: str, window) -> int:
    """The window as a Python int (0 = full attention), or Unsupported when it is traced."""
    if window is None:
        return 0
    try:
        return int(window)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        raise _refuse(
            implementation, "a per-layer sliding window traced under the layer scan (model.sliding_window)"
        ) from None


def _interpret(implementation: str, native: str) -> bool:
    """True to run a Pallas kernel in the interpreter (cpu); False on its native platform."""
    platform = target_platform()
    if platform == native:
        return False
    if platform == "cpu":
        return True
    raise _refuse(implementation, f"platform {platform} (it runs on {native}, or interpreted on cpu)")


def _tile(implementation: str, length: int, largest: int) -> int:
    """The largest multiple of 128 up to `largest` that divides the row length."""
    if length % _LANES:
        raise _refuse(
            implementation, f"a row length of {length} tokens (data.max_length must be a multiple of {_LANES})"
        )
    return max(b for b in range(_LANES, largest + 1, _LANES) if length % b == 0)


def _per_device(kernel, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
    """kernel(q, k, v, segment_ids) on each device's rows and heads under the ambient mesh.

    Heads split as the `heads` rule says, and kv heads the same way, so a device holds whole
    GQA groups (its query heads read exactly its kv heads); where the kv heads do not divide
    (fewer kv heads than the axis), heads are not split.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    rules = dict(nn.get_logical_axis_rules())

    def mesh_axes(logical: str, length: int, taken=()):
        names = rules.get(logical) or ()
        names = tuple(
            a
            for a in ((names,) if isinstance(names, str) else names)
            if a in mesh.axis_names and a not in taken and mesh.shape[a] > 1
        )
        return names if names and length % math.prod(mesh.shape[a] for a in names) == 0 else None

    batch = mesh_axes("batch", segment_ids_BxT.shape[0])
    heads = mesh_axes("heads", q_BxTxNxH.shape[2], batch or ())
    if heads and k_BxTxKxH.shape[2] % math.prod(mesh.shape[a] for a in heads):
        heads = None
    spec = P(batch, None, heads, None)
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)), out_specs=spec, check_vma=False
    )(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


def splash_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, scale, softcap, window):
    """TPU splash attention: block-sparse causal (or local) mask plus SegmentIds, native GQA."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    interpret = _interpret("splash", "tpu")
    window = _static_window("splash", window)
    t = q_BxTxNxH.shape[1]
    tile = _tile("splash", t, 512)
    # LocalMask keeps q - (window - 1) <= k <= q: the xla window t - s < window.
    head_mask = masks.LocalMask((t, t), (window - 1, 0), offset=0) if window else masks.CausalMask((t, t))
    blocks = splash.BlockSizes(
        block_q=tile,
        block_kv=tile,
        block_kv_compute=tile,
        block_q_dkv=tile,
        block_kv_dkv=tile,
        block_kv_dkv_compute=tile,
        block_q_dq=tile,
        block_kv_dq=tile,
    )
    heads_first = lambda x: x.transpose(0, 2, 1, 3)

    def run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
        # One mask per query head on this device.
        kernel = splash.make_splash_mha(
            masks.MultiHeadMask([head_mask] * q_BxTxNxH.shape[2]),
            block_sizes=blocks,
            attn_logits_soft_cap=softcap or None,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
        out_BxNxTxH = jax.vmap(kernel)(
            heads_first(q_BxTxNxH),
            heads_first(k_BxTxKxH),
            heads_first(v_BxTxKxH),
            splash.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT),
        )
        return heads_first(out_BxNxTxH)

    # The kernel has no scale argument: scale q (in float32, one rounding) before it.
    q_BxTxNxH = (q_BxTxNxH.astype(jnp.float32) * scale).astype(q_BxTxNxH.dtype)
    return _per_device(run, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


def pallas_gpu_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, scale, softcap, window):
    """Pallas/Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha) with segment ids."""
    from jax.experimental.pallas.ops.gpu import attention as flash

    interpret = _interpret("pallas_gpu", "gpu")
    if softcap:
        raise _refuse("pallas_gpu", "logit soft-capping (model.attn_logit_softcap)")
    if _static_window("pallas_gpu", window):
        raise _refuse("pallas_gpu", "a sliding window (model.sliding_window)")
    _tile("pallas_gpu", q_BxTxNxH.shape[1], _LANES)
    # The kernel has no grouped heads: repeat each kv head over its query heads (head n reads
    # kv head n // groups); the gradient of the repeat sums them back.
    groups = q_BxTxNxH.shape[2] // k_BxTxKxH.shape[2]

    def run(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
        k_BxTxNxH, v_BxTxNxH = (jnp.repeat(x, groups, axis=2) for x in (k_BxTxKxH, v_BxTxKxH))
        return flash.mha(
            q_BxTxNxH,
            k_BxTxNxH,
            v_BxTxNxH,
            segment_ids_BxT,
            sm_scale=scale,
            causal=True,
            block_sizes=flash.BlockSizes.get_default(),
            interpret=interpret,
        )

    return _per_device(run, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


def cudnn_attention(
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, scale, softcap, window, implementation: str = "cudnn"
):
    """cuDNN fused attention through jax.nn.dot_product_attention.

    It has no segment ids: the packed mask goes in as a boolean [B, 1, T, T], which cuDNN
    turns into a dense bias (O(T^2) memory per row). `implementation` other than 'cudnn' only
    serves the tests, which check this wrapper's mask and window through jax's xla path on cpu.
    """
    if softcap:
        raise _refuse("cudnn", "logit soft-capping (model.attn_logit_softcap)")
    window = _static_window("cudnn", window)
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise _refuse("cudnn", f"platform {jax.default_backend()} (it needs a GPU)")
        if q_BxTxNxH.dtype not in (jnp.bfloat16, jnp.float16):
            raise _refuse("cudnn", f"{q_BxTxNxH.dtype} activations (set model.dtype=bfloat16)")
    same_segment_Bx1xTxT = (segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(
        q_BxTxNxH,
        k_BxTxKxH,
        v_BxTxKxH,
        mask=same_segment_Bx1xTxT,
        scale=scale,
        is_causal=True,
        local_window_size=(window - 1, 0) if window else None,
        implementation=implementation,
    )
