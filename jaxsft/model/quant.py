"""QLoRA's quantised frozen base: int8 and NF4 block kernels, dequantised one layer at a time.

Job: store the seven block kernels of a LoRA/DoRA run's frozen base (q k v o gate up down;
embeddings, norms and the head stay in `param_dtype`) as integer codes plus absmax scales,
and give them back in float32 inside the layer scan, one layer's kernels at a time.

Design
------
- A quantised kernel is a dict node in place of the array, in the same pure-dict tree:
  `{"codes": ..., "scales": ...}` (double quantisation: `scale_codes`, `scale_step`,
  `scale_offset` instead of `scales`). Every leaf keeps the kernel's rank and its leading
  'layers' axis, so it carries the kernel's logical axis names, shards through the same
  rules (a length that does not split is replicated, train/sharding.py), and the layer
  scan slices it like any stacked param.
- Blocks run along the kernel's last input axis (d for q/k/v/gate/up, f for down, the
  head dim for o): `quant_block_size` consecutive inputs of one output feature share one
  absmax scale. A Hugging Face [out, in] weight is row-major, so these are exactly the
  blocks bitsandbytes takes of the flattened weight (when the block divides the row).
  `quant_block_size: 0` gives one scale per output feature (over every input axis).
- int8: codes = round(w / s), s = absmax / 127, codes in [-127, 127]; w' = codes * s.
- NF4 (Dettmers et al. 2023): the 16 NormalFloat levels of the paper's appendix E (the
  table bitsandbytes ships), w / absmax mapped to the nearest level (midpoint thresholds,
  a tie goes to the lower level as in bitsandbytes), two 4-bit codes per uint8 along the
  blocked axis, the first of a pair in the high nibble; w' = level[code] * absmax.
- Double quantisation (`double_quant`): the float32 scales of one output feature's blocks
  are stored as int8 codes around their mean (s = code * step + offset), two float32
  numbers per output feature instead of one per block (4.127 bits per weight for NF4
  blocks of 64 on Llama-3.1-8B's shapes, against 4.5). The paper quantises the scales to
  8-bit floats in blocks of 256 of the flattened tensor; ours stay in the kernel's layout
  so that they shard with it.
- Dequantisation is float32 (exact codes x scales: DoRA's norm sees the very kernel the
  matmul uses); the layer casts it to the compute dtype. The backward pass must never keep
  the dequantised kernels of every layer (that is the whole base in float again): under
  remat they are recomputed like everything else, and with `model.remat: none` the decoder
  runs a quantised stack under `dots_with_no_batch_dims_saveable` (the x W outputs are
  kept as without remat; kernels, norms and attention scores are recomputed). Saving
  "everything but the named kernels" does not work: the einsum's own transposes of W are
  unnamed residuals too.

Why not qwix: its `quantize`/`dequantize` (QArray) were evaluated first (0.1.8: no jax pin,
flax >= 0.12). NF4 there is one `uint4` per weight (one byte per weight on CPU, packing left
to the backend), there is no double quantisation, the nearest-level search is a vmapped
argmin, and a QArray is a pytree node of its own with a static qtype that our logical-spec,
sharding and streaming-import trees (pure dicts of arrays) would each have to special-case;
its LoRA/QLoRA provider intercepts NNX module calls rather than a scanned pure function.
What we would have used of it is the absmax arithmetic below, so it is written here.

Contract (params: pure dicts laid out as `abstract_params`; `cfg`: PeftConfig):
    quantize_base(params, cfg) -> params with the seven kernels quantised (idempotent; none: unchanged)
    quantize_specs(specs, cfg) -> logical specs of that tree
    dequantize_base(params) -> float32 kernels again;  kernels_as(params, dtype, cfg)
    dequantize_layer(layer_params) -> one layer's params with float32 kernels (inside the scan)
    shape_view(params) -> quantised kernels as ShapeDtypeStructs (for `nnx.merge`, nothing computed)
    kernel_shape(node, path) -> the kernel's shape;  quantize(w, in_axes, ...) / dequantize(node, in_axes)
    zeros(path, shape, cfg, shardings) / set_layer(node, w, layer, path, cfg): streaming import
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxsft.config import ConfigError, PeftConfig
from jaxsft.model import paths
from jaxsft.model.lora_branch import KERNELS

# bitsandbytes' NF4 table (functional.py), the QLoRA paper's appendix E.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
_NF4_MIDPOINTS = ((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2).astype(np.float32)
KERNEL_PATHS = tuple(path for path, _ in KERNELS.values())
_N_IN = {path: n_in for path, n_in in KERNELS.values()}


def in_axes(path: str, stacked: bool = True) -> tuple[int, ...]:
    """The input axes of the kernel at `path` ("blocks/attn/o_proj" or, inside a layer, "attn/o_proj")."""
    n_in = _N_IN["blocks/" + path.removeprefix("blocks/")]
    return tuple(range(int(stacked), int(stacked) + n_in))


def quantized(node) -> bool:
    return isinstance(node, dict) and "codes" in node


def quantized_stack(blocks) -> bool:
    """Whether a layer stack (`blocks`, stacked or one layer) holds quantised kernels."""
    return isinstance(blocks, dict) and any(quantized(_get(blocks, p.removeprefix("blocks/"))) for p in KERNEL_PATHS)


# ---------------------------------------------------------------------------- one kernel


def _split(x, axis: int, groups: int):
    """Axis `axis` of length n -> (groups, n // groups)."""
    return x.reshape(x.shape[:axis] + (groups, x.shape[axis] // groups) + x.shape[axis + 1 :])


def _join(x, axis: int):
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])


def _per_block(op, x, scales, axis: int):
    """op(x, scale of x's block): scales hold one entry per block along `axis` (size-1 axes broadcast)."""
    return _join(op(_split(x, axis, scales.shape[axis]), jnp.expand_dims(scales, axis + 1)), axis)


def _absmax(w, axes: tuple[int, ...], block_size: int, name: str):
    axis, length = axes[-1], w.shape[axes[-1]]
    if block_size and length % block_size:
        raise ConfigError(
            f"model.peft.quant_block_size={block_size} does not divide {name}'s input axis ({length} features); "
            f"pick a divisor of it, or 0 for one scale per output feature"
        )
    groups = length // block_size if block_size else 1
    others = () if block_size else axes[:-1]  # per output feature: over every input axis
    return jnp.max(jnp.abs(_split(w, axis, groups)), axis=(axis + 1, *others), keepdims=True).squeeze(axis + 1)


def _safe(s):
    return jnp.where(s == 0, 1.0, s)


def _int8(x):
    return jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8)


def _nf4_codes(x_unit):
    """Index of the nearest NF4 level of each value in [-1, 1] (ties to the lower level)."""
    codes = jnp.zeros(x_unit.shape, jnp.uint8)
    for midpoint in _NF4_MIDPOINTS:
        codes = codes + (x_unit > midpoint).astype(jnp.uint8)
    return codes


def _pack(codes, axis: int):
    pairs = _split(codes, axis, codes.shape[axis] // 2)
    high, low = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return (high << 4) | low


def _unpack(packed, axis: int):
    return _join(jnp.stack([packed >> 4, packed & 0xF], axis=axis + 1), axis)


def _quantize_scales(scales, axis: int) -> dict:
    """Double quantisation: one output feature's block scales as int8 around their mean."""
    offset = jnp.mean(scales, axis=axis, keepdims=True)
    step = jnp.max(jnp.abs(scales - offset), axis=axis, keepdims=True) / 127
    return {"scale_codes": _int8((scales - offset) / _safe(step)), "scale_step": step, "scale_offset": offset}


def _scales(node: dict):
    if "scales" in node:
        return node["scales"]
    return node["scale_codes"].astype(jnp.float32) * node["scale_step"] + node["scale_offset"]


def quantize(
    w, axes: tuple[int, ...], method: str, block_size: int, double_quant: bool = False, name: str = "kernel"
) -> dict:
    """A kernel (any leading axes) as codes + absmax scales; blocks along `axes[-1]`, its last input axis."""
    w32, axis = w.astype(jnp.float32), axes[-1]
    absmax = _absmax(w32, axes, block_size, name)
    if method == "int8":
        scales = absmax / 127
        codes = _int8(_per_block(jnp.divide, w32, _safe(scales), axis))
    elif method == "nf4":
        if w.shape[axis] % 2:
            raise ConfigError(f"model.peft.quantize=nf4: {name}'s input axis ({w.shape[axis]}) must be even")
        scales = absmax
        codes = _pack(_nf4_codes(_per_block(jnp.divide, w32, _safe(scales), axis)), axis)
    else:
        raise ValueError(f"quantize: unknown method {method!r}")
    return {"codes": codes, **(_quantize_scales(scales, axis) if double_quant else {"scales": scales})}


def dequantize(node: dict, axes: tuple[int, ...]):
    """float32 codes x scales, the kernel's shape."""
    codes, axis = node["codes"], axes[-1]
    if codes.dtype == jnp.uint8:  # nf4, two codes per byte
        values = jnp.asarray(NF4_LEVELS)[_unpack(codes, axis)]
    else:
        values = codes.astype(jnp.float32)
    return _per_block(jnp.multiply, values, _scales(node), axis)


def kernel_shape(node, path: str) -> tuple[int, ...]:
    """The shape of the (stacked) kernel at `path`, quantised or not."""
    if not quantized(node):
        return tuple(node.shape)
    shape = list(node["codes"].shape)
    if node["codes"].dtype == jnp.uint8:
        shape[in_axes(path)[-1]] *= 2
    return tuple(shape)


# ---------------------------------------------------------------------------- whole trees


def _copy(params: dict) -> dict:
    """A new dict tree whose leaves are shared."""
    return paths.unflatten(paths.flatten(params))


def quantize_base(params: dict, cfg: PeftConfig) -> dict:
    """The params with every block kernel quantised per `cfg`; kernels already quantised stay as they are."""
    if cfg.quantize == "none":
        return params
    out = _copy(params)
    for path in KERNEL_PATHS:
        w = paths.get(params, path)
        if not quantized(w):
            node = quantize(w, in_axes(path), cfg.quantize, cfg.quant_block_size, cfg.double_quant, path)
            paths.put(out, path, node)
    return out


def quantize_specs(specs: dict, cfg: PeftConfig) -> dict:
    """Logical specs of `quantize_base`'s tree: every leaf of a kernel's node takes the kernel's spec."""
    if cfg.quantize == "none":
        return specs
    out = _copy(specs)
    keys = ("scale_codes", "scale_step", "scale_offset") if cfg.double_quant else ("scales",)
    for path in KERNEL_PATHS:
        spec = paths.get(specs, path)
        paths.put(out, path, {key: spec for key in ("codes", *keys)})
    return out


def _map_kernels(params: dict, fn, stacked: bool = True) -> dict:
    prefix = "blocks/" if stacked else ""
    present = [p for p in KERNEL_PATHS if quantized(_get(params, prefix + p.removeprefix("blocks/")))]
    if not present:
        return params
    out = _copy(params)
    for path in present:
        path = prefix + path.removeprefix("blocks/")
        paths.put(out, path, fn(paths.get(params, path), path))
    return out


def _get(tree, path: str):
    try:
        return paths.get(tree, path)
    except (KeyError, TypeError):
        return None


def dequantize_base(params: dict) -> dict:
    """float32 kernels in place of quantised ones (export, generation, DoRA's starting magnitude)."""
    return _map_kernels(params, lambda node, path: dequantize(node, in_axes(path)))


def kernels_as(params: dict, dtype, cfg: PeftConfig) -> dict:
    """The seven kernels cast to `dtype` (None: unchanged) when the base was quantised."""
    if cfg.quantize == "none" or dtype is None:
        return params
    out = _copy(params)
    for path in KERNEL_PATHS:
        paths.put(out, path, paths.get(params, path).astype(dtype))
    return out


def dequantize_layer(layer):
    """One layer's params (the scan's slice of `blocks`) with float32 kernels; anything else unchanged."""
    if not isinstance(layer, dict):
        return layer
    return _map_kernels(layer, lambda node, path: dequantize(node, in_axes(path, stacked=False)), stacked=False)


def shape_view(params: dict) -> dict:
    """Quantised kernels as float32 ShapeDtypeStructs: what `nnx.merge` needs of a layer stack the
    model never reads directly (the scan dequantises its own slices)."""
    return _map_kernels(params, lambda node, path: jax.ShapeDtypeStruct(kernel_shape(node, path), jnp.float32))


# ---------------------------------------------------------------------------- streaming import


def zeros(path: str, shape: tuple[int, ...], cfg: PeftConfig, shardings: dict) -> dict:
    """An empty quantised (stacked) kernel on `shardings`, filled layer by layer by `set_layer`."""
    abstract = jax.eval_shape(
        lambda w: quantize(w, in_axes(path), cfg.quantize, cfg.quant_block_size, cfg.double_quant, path),
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return jax.tree.map(lambda x, s: jnp.zeros(x.shape, x.dtype, device=s), abstract, shardings)


@partial(jax.jit, donate_argnums=0, static_argnums=(3, 4, 5, 6))
def _set_layer(node, w, layer, axes, method, block_size, double_quant):
    quantized_layer = quantize(w, axes, method, block_size, double_quant)
    return jax.tree.map(lambda stacked, x: stacked.at[layer].set(x), node, quantized_layer)


def set_layer(node: dict, w, layer: int, path: str, cfg: PeftConfig) -> dict:
    """`node` with layer `layer` replaced by the quantised `w` (one layer's kernel, on the mesh)."""
    axes = in_axes(path, stacked=False)
    jax.eval_shape(
        lambda x: quantize(x, axes, cfg.quantize, cfg.quant_block_size, name=path), w
    )  # errors name the path
    return _set_layer(node, w, layer, axes, cfg.quantize, cfg.quant_block_size, cfg.double_quant)
