"""Parameter-efficient fine-tuning: which params train, and how the model sees the rest.

Job: split a model's params into a trainable tree (what the optimizer and checkpoints
hold) and a frozen tree (a step argument that is never differentiated), and hand both
back to the model.

Methods (`model.peft.method`):
- `none`: full fine-tuning; everything trains, nothing is frozen.
- `lora` / `dora`: trainable = the adapters (lora.py), frozen = the whole base; with
  `quantize: int8 | nf4` (QLoRA) its block kernels are stored quantised (quant.py).
- `freeze`: trainable = the params whose path matches `trainable` (regexes searched in
  "embedding", "lm_head", "final_norm/scale", and per layer "blocks/7/attn/q_bias",
  "blocks/7/mlp_norm/scale", ...) plus every param of the `top_layers` top blocks; the
  rest is frozen. BitFit (`_bias`), norms only (`norm`) and top-N layers are all this.
- `adapter`: trainable = bottleneck adapters after the attention and/or MLP branches
  (bottleneck.py), frozen = the whole base; run as a hook in the layer scan like LoRA.
- `prefix_tuning` / `prompt_tuning`: trainable = per-layer key/value prefixes or virtual
  input embeddings (prompts.py), frozen = the whole base; the model attends to a prefix.
  Adapters, prefixes and prompts cannot be merged into the base's weights (`mergeable`).
- A selection that trains nothing is refused in one line (`check`, and at `init`).

Design
------
- Block params are stacked over layers, so a freeze selection may take some layers of
  a stacked param and not others. The layer range is cut into segments inside which
  every param is either wholly trained or wholly frozen; each param is stored per
  segment (`blocks/<start>_<stop>/...`), and the model runs one scan per segment.
  Slices are made once, when the state is built; nothing is concatenated per step, and
  the backward pass never reaches below the lowest trained segment.
- Trained slices of `freeze` are float32 (master weights) whatever `param_dtype`; the
  frozen tree keeps `param_dtype` (bf16 storage of a frozen base is fine).
- Every function here works on arrays, on abstract shapes and on logical spec trees
  (whose leaves are PartitionSpec tuples: a segment keeps the spec of its param).

Contract:
    enabled(cfg) -> bool;  mergeable(cfg) -> bool (the trainable part folds into the base's weights)
    init(cfg, params, key, prompt_ids=(), embed_scale=1.0) -> (trainable, frozen)   fresh adapters/prefixes/prompts
    frozen_of(cfg, params) -> frozen                   the frozen tree alone
    split_specs(cfg, specs, abstract) -> (trainable specs, frozen specs)
    model_inputs(cfg, trainable, frozen) -> (params for nnx.merge, blocks for Transformer.__call__)
    prefix(cfg, trainable, model) -> the `prefix` argument of Transformer.__call__ (None without one)
    load(cfg, directory, params) -> trainable   `init_from` of adapter / prefix / prompt tuning, checked against cfg
    merged(cfg, trainable, frozen, dtype) -> full params (export, generation)
    count(model_cfg, vocab_size) -> (trainable, total), without allocating anything
    check(model_cfg) -> None, or one ConfigError line (kernel, window, a selection that trains nothing)
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.model import bottleneck, hf_prompt, lora, paths, prompts, quant
from jaxsft.model.families import resolve
from jaxsft.model.transformer import abstract_params

# Methods whose frozen tree is the whole base and whose trainable part is a tree of its own.
_OWN_TREE = ("adapter", "prefix_tuning", "prompt_tuning")


def enabled(cfg: PeftConfig) -> bool:
    return cfg.method != "none"


def mergeable(cfg: PeftConfig) -> bool:
    return cfg.method not in _OWN_TREE


def _n_layers(params) -> int:
    return int(jax.tree.leaves(params["blocks"])[0].shape[0])


# ---------------------------------------------------------------------------- freeze


def _patterns(cfg: PeftConfig) -> list[re.Pattern]:
    out = []
    for pattern in cfg.trainable:
        try:
            out.append(re.compile(pattern))
        except re.error as e:
            raise ConfigError(f"model.peft.trainable: {pattern!r} is not a valid regex ({e})") from None
    return out


def _selection(cfg: PeftConfig, paths: list[str], n_layers: int) -> dict[str, tuple[bool, ...] | bool]:
    """Per param path: trained or not (block params: per layer)."""
    patterns = _patterns(cfg)
    hit = lambda path: any(p.search(path) for p in patterns)  # noqa: E731
    top = n_layers - min(cfg.top_layers, n_layers)
    out = {}
    for path in paths:
        if path.startswith("blocks/"):
            rest = path[len("blocks/") :]
            out[path] = tuple(i >= top or hit(f"blocks/{i}/{rest}") for i in range(n_layers))
        else:
            out[path] = hit(path)
    if not any(any(v) if isinstance(v, tuple) else v for v in out.values()):
        biases = any("bias" in p for p in cfg.trainable) and not any("bias" in p for p in paths)
        raise ConfigError(
            f"model.peft.trainable: {list(cfg.trainable)} match no parameter, nothing would train"
            + (
                " (this model has no biases: BitFit needs a family with biases, such as qwen2)"
                if biases
                else " (paths look like embedding, final_norm/scale, blocks/0/attn/q_proj, blocks/0/mlp_norm/scale)"
            )
        )
    return out


def _segments(selection: dict, n_layers: int) -> list[tuple[int, int]]:
    """Maximal layer ranges inside which every block param is wholly trained or wholly frozen."""
    cuts = (
        [0]
        + [i for i in range(1, n_layers) if any(v[i] != v[i - 1] for v in selection.values() if isinstance(v, tuple))]
        + [n_layers]
    )
    return list(zip(cuts[:-1], cuts[1:]))


def _freeze_split(cfg: PeftConfig, tree, n_layers: int, take):
    """(trainable, frozen) flat dicts; `take(leaf, start, stop)` slices a block param's layers."""
    flat = paths.flatten(tree)
    selection = _selection(cfg, list(flat), n_layers)
    trainable, frozen = {}, {}
    for path, leaf in flat.items():
        if not path.startswith("blocks/"):
            (trainable if selection[path] else frozen)[path] = leaf
            continue
        rest = path[len("blocks/") :]
        for start, stop in _segments(selection, n_layers):
            side = trainable if selection[path][start] else frozen
            side[f"blocks/{start}_{stop}/{rest}"] = take(leaf, start, stop)
    return paths.unflatten(trainable), paths.unflatten(frozen)


def _slice(leaf, start, stop):
    return leaf[start:stop]


# ---------------------------------------------------------------------------- contract


def _dims(params) -> tuple[int, int]:
    """(L, D) of a model's params (arrays or abstract)."""
    return _n_layers(params), int(params["embedding"].shape[1])


def init(cfg: PeftConfig, params, key: jax.Array, prompt_ids=(), embed_scale: float = 1.0):
    """(trainable, frozen) from the full params (arrays or abstract, inside jit for placement).
    Prompt tuning: `prompt_ids` its init text as token ids (empty: random vocabulary rows),
    `embed_scale` the model's token-embedding scale (prompts.embed_scale)."""
    if cfg.method == "adapter":
        return bottleneck.init(cfg, *_dims(params), key), params
    if prompts.enabled(cfg):
        return prompts.init(cfg, params, key, prompt_ids, embed_scale), params
    if cfg.adapters:
        frozen = quant.quantize_base(params, cfg)  # QLoRA (quant.py); the base itself otherwise
        return lora.init_adapters(frozen, cfg, key), frozen
    if cfg.method == "freeze":
        trainable, frozen = _freeze_split(cfg, params, _n_layers(params), _slice)
        return jax.tree.map(lambda x: x.astype(jnp.float32), trainable), frozen
    return params, None


def frozen_of(cfg: PeftConfig, params):
    if cfg.method in _OWN_TREE:
        return params
    if cfg.method == "freeze":
        return _freeze_split(cfg, params, _n_layers(params), _slice)[1]
    return quant.quantize_base(params, cfg) if cfg.adapters else None


def split_specs(cfg: PeftConfig, specs, abstract):
    """Logical specs of (trainable, frozen): adapters per lora.py, freeze slices keep their param's spec."""
    if cfg.method == "adapter":
        return bottleneck.specs(cfg), specs
    if prompts.enabled(cfg):
        return prompts.specs(cfg), specs
    if cfg.adapters:
        return lora.adapter_specs(specs, abstract, cfg), quant.quantize_specs(specs, cfg)
    if cfg.method == "freeze":
        return _freeze_split(cfg, specs, _n_layers(abstract), lambda leaf, *_: leaf)
    return specs, None


def _segment_key(key: str) -> tuple[int, int]:
    start, stop = key.split("_")
    return int(start), int(stop)


def model_inputs(cfg: PeftConfig, trainable, frozen):
    """(params for `nnx.merge`, `blocks` for the model call) from the two trees."""
    if cfg.method == "adapter":
        return frozen, [(frozen["blocks"], trainable["blocks"])]
    if prompts.enabled(cfg):
        return frozen, None
    if cfg.adapters:  # a quantised base is dequantised layer by layer inside the scan
        return quant.shape_view(frozen), [(frozen["blocks"], trainable["blocks"])]
    if cfg.method != "freeze":
        return trainable, None
    both = {**paths.flatten(trainable), **paths.flatten(frozen)}
    params = paths.unflatten({p: v for p, v in both.items() if not p.startswith("blocks/")})
    by_segment: dict[tuple[int, int], dict] = {}
    for path, value in both.items():
        if path.startswith("blocks/"):
            _, segment, rest = path.split("/", 2)
            by_segment.setdefault(_segment_key(segment), {})[rest] = value
    blocks = [(paths.unflatten(by_segment[k]), None) for k in sorted(by_segment)]
    # The graph needs *a* layer stack to merge into; the call runs `blocks`, not this one.
    params["blocks"] = blocks[0][0]
    return params, blocks


def prefix(cfg: PeftConfig, trainable, model):
    """The per-layer prefix `model` (the merged frozen base) attends to; None for other methods."""
    return prompts.prefix(cfg, trainable, model) if prompts.enabled(cfg) else None


def load(cfg: PeftConfig, directory, params):
    """The trainable part of `model.peft.init_from` for adapter, prefix or prompt tuning (our
    adapter files, or a HF PEFT prefix/prompt directory); its settings must match `cfg`."""
    if cfg.method == "adapter":
        fields, trainable = bottleneck.load(directory, *_dims(params))
    else:
        fields, trainable = hf_prompt.load(directory, params)
        if cfg.method == "prefix_tuning" and cfg.prefix_projection:
            raise ConfigError(
                f"model.peft.init_from={directory}: a saved prefix holds no projection MLP; "
                "set model.peft.prefix_projection=false to continue from it"
            )
    wanted = {k: getattr(cfg, k) for k in fields}
    if fields != wanted:
        settings = ", ".join(f"{k}={v}" for k, v in fields.items())
        raise ConfigError(f"model.peft.init_from={directory}: {settings}; set model.peft.{', '.join(fields)} to match")
    return trainable


def merged(cfg: PeftConfig, trainable, frozen, dtype=None):
    """The full params the run's model computes with (adapters merged, segments joined)."""
    if not mergeable(cfg):
        raise ConfigError(f"model.peft.method={cfg.method}: its trained part cannot be merged into the base's weights")
    if cfg.adapters:  # QLoRA: W = codes x scales in float32, then W + s A B
        return quant.kernels_as(lora.merge(quant.dequantize_base(frozen), trainable, cfg, dtype=dtype), dtype, cfg)
    if cfg.method != "freeze":
        return trainable
    params, blocks = model_inputs(cfg, trainable, frozen)
    params["blocks"] = jax.tree.map(lambda *xs: jnp.concatenate(xs), *[b for b, _ in blocks])
    return jax.tree.map(lambda x: x.astype(dtype), params) if dtype else params


def count(model_cfg: ModelConfig, vocab_size: int) -> tuple[int, int]:
    """(trainable, total) parameters as PEFT prints them, from shapes only."""
    cfg = model_cfg.peft
    if cfg.adapters:
        return lora.count(model_cfg, vocab_size, cfg)
    params = abstract_params(model_cfg, vocab_size)
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    if cfg.method in _OWN_TREE:
        trainable = bottleneck.count(model_cfg) if cfg.method == "adapter" else prompts.count(model_cfg)
        return trainable, total + trainable
    if cfg.method != "freeze":
        return total, total
    trainable = jax.eval_shape(lambda p: init(cfg, p, jax.random.key(0))[0], params)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)), total


def check(model_cfg: ModelConfig) -> None:
    """Refuses in one line, before data or compilation, what a PEFT method cannot do on this model:
    a prefix with a kernel or sliding window that cannot take it, a selection that trains nothing."""
    m = resolve(model_cfg)
    if not enabled(m.peft):
        return
    prompts.check(m)
    trainable, _ = count(m, m.vocab_size or 8)
    if not trainable:
        raise ConfigError(f"model.peft: method {m.peft.method} selects no trainable parameter, nothing would train")
