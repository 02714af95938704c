"""Run directories and Hugging Face directories as models ready to use.

Job: load the model of a finished (or running) jaxsft run, or of a Hugging Face
directory, with its tokenizer and template; export a run as a Hugging Face directory.

Contract:
    load(source) -> Loaded(graphdef, params, model_cfg, vocab_size, tokenizer, template_name)
        source: a run directory (config.yaml + checkpoints/), one step of it (`RUN/checkpoints/STEP`),
                `hf:/dir` or `orbax:/dir`
    export_hf(run_dir, out_dir, *, dtype, max_shard_bytes, merge) -> list of written files
    export_peft(run_dir, out_dir) -> list of written files (LoRA/DoRA adapters, prefixes or prompts: HF PEFT format)
    export_adapter(run_dir, out_dir) -> list of written files (bottleneck adapters: our format, bottleneck.py)

A PEFT run's checkpoints hold only its trainable part (adapters, or the params a
`freeze` run trains); its base is what its config names (`model.init_from`, else the
seed's random init). Loading such a run merges the two (peft.merged), so generation and
`--format hf --merge` see the adapted model; bottleneck adapters, prefixes and prompts do
not merge into weights, so their runs load as the base plus the trained part (adapted.py).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft import config as config_lib
from jaxsft import config_load
from jaxsft.config import ConfigError, ModelConfig
from jaxsft.infer import hf_files
from jaxsft.model import adapted, bottleneck, hf, hf_peft, hf_prompt, peft, pretrained, quant
from jaxsft.model.transformer import abstract_model, abstract_params

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class Loaded:
    graphdef: Any
    params: Any  # pure dict of arrays
    model_cfg: ModelConfig
    vocab_size: int
    tokenizer: Any
    template_name: str


def _graphdef(cfg: ModelConfig, vocab_size: int):
    return nnx.graphdef(abstract_model(cfg, vocab_size))


def _tokenizer(spec: str):
    from jaxsft.data.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def _replicated(cfg: ModelConfig, vocab_size: int, pe: config_lib.PeftConfig = config_lib.PeftConfig()) -> dict:
    """One device's shardings for the params (laid out like the quantised base under QLoRA `pe`)."""
    mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])
    layout = jax.eval_shape(lambda p: quant.quantize_base(p, pe), abstract_params(cfg, vocab_size))
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), layout)


def _load_pretrained(source: str) -> Loaded:
    """`hf:/dir` or `orbax:/dir` (from `jaxsft convert`), with the directory's tokenizer and template."""
    cfg = pretrained.resolve_config(ModelConfig(init_from=source))
    vocab = cfg.vocab_size
    params = pretrained.load_pretrained(cfg, vocab, _replicated(cfg, vocab))
    directory = Path(source.split(":", 1)[1])
    # A jaxsft export of a SentencePiece run carries tokenizer.model, not tokenizer.json.
    spm_only = not (directory / "tokenizer.json").is_file() and (directory / "tokenizer.model").is_file()
    tokenizer = _tokenizer(str(directory / "tokenizer.model") if spm_only else f"hf:{directory}")
    return Loaded(_graphdef(cfg, vocab), params, cfg, vocab, tokenizer, "hf")


def _load_run(run_dir: Path, step: int | None = None) -> Loaded:
    from jaxsft.train.checkpoint import read_state

    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: no config.yaml (expected a jaxsft run directory or hf:/path)")
    cfg = config_load.load(run_dir / "config.yaml")
    try:
        params = read_state(run_dir, step)["params"]
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    method = cfg.model.peft
    model_cfg = pretrained.resolve_config(dataclasses.replace(cfg.model, init_from="", peft=config_lib.PeftConfig()))
    tokenizer = _tokenizer(_tokenizer_spec(run_dir, cfg))
    if peft.enabled(method):
        vocab = cfg.model.vocab_size or tokenizer.vocab_size
        frozen = peft.frozen_of(method, _peft_base(cfg, model_cfg, vocab))
        if not peft.mergeable(method):
            graphdef, params = adapted.build(model_cfg, vocab, method, frozen, params)
            return Loaded(graphdef, params, model_cfg, vocab, tokenizer, cfg.data.template)
        params = peft.merged(method, params, frozen, dtype=model_cfg.param_dtype)
    vocab = int(params["embedding"].shape[0])
    return Loaded(_graphdef(model_cfg, vocab), params, model_cfg, vocab, tokenizer, cfg.data.template)


def _peft_base(cfg, model_cfg: ModelConfig, vocab: int) -> dict:
    """The base a PEFT run trained on: the trainer's own choice of base (`state.base_params`)."""
    from jaxsft.train.state import base_params

    return base_params(cfg.model, vocab, _replicated(model_cfg, vocab, cfg.model.peft), cfg.train.seed)


def _tokenizer_spec(run_dir: Path, cfg) -> str:
    """The run's own copy: tokenizer.model (SentencePiece) or tokenizer/ (Hugging Face)."""
    if (run_dir / "tokenizer.model").is_file():
        return str(run_dir / "tokenizer.model")
    if (run_dir / "tokenizer").is_dir():
        return f"hf:{run_dir / 'tokenizer'}"
    return cfg.data.tokenizer


def run_and_step(source: str | Path) -> tuple[Path, int | None]:
    """`RUN/checkpoints/STEP` -> (RUN, STEP); a run directory -> (it, None: the latest step)."""
    path = Path(source)
    if path.parent.name == "checkpoints" and path.name.isdigit():
        return path.parent.parent, int(path.name)
    return path, None


def load(source: str | Path) -> Loaded:
    source = str(source)
    if source.startswith(pretrained.PREFIXES):
        return _load_pretrained(source)
    return _load_run(*run_and_step(source))


def export_peft(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """A LoRA/DoRA, prefix- or prompt-tuning run's latest trained part as adapter_config.json +
    adapter_model.safetensors, in Hugging Face PEFT's format."""
    from jaxsft.train.checkpoint import read_state

    run_dir = Path(run_dir)
    cfg = config_load.load(run_dir / "config.yaml")
    if cfg.model.peft.method == "adapter":
        raise ConfigError(f"{run_dir}: Hugging Face PEFT has no bottleneck adapters; export it with --format adapter")
    if cfg.model.peft.method in ("prefix_tuning", "prompt_tuning"):
        model = pretrained.resolve_config(cfg.model)
        dims = (model.n_layers, model.d_model, model.n_heads, model.n_kv_heads, model.head_dim)
        return hf_prompt.save(cfg.model.peft, read_state(run_dir)["params"], out_dir, dims, _base_dir(cfg))
    if not cfg.model.peft.adapters:
        raise ConfigError(
            f"{run_dir}: not a LoRA/DoRA run (model.peft.method is {cfg.model.peft.method}); export it with --format hf"
        )
    return hf_peft.save_peft(read_state(run_dir)["params"], cfg.model.peft, out_dir, base_model=_base_dir(cfg))


def _base_dir(cfg) -> str:
    return cfg.model.init_from.split(":", 1)[1] if cfg.model.init_from.startswith("hf:") else ""


def export_adapter(run_dir: str | Path, out_dir: str | Path) -> list[str]:
    """A bottleneck-adapter run's latest adapters in our own format (bottleneck.py); they load
    back through `model.peft.init_from`."""
    from jaxsft.train.checkpoint import read_state

    run_dir = Path(run_dir)
    cfg = config_load.load(run_dir / "config.yaml")
    if cfg.model.peft.method != "adapter":
        raise ConfigError(
            f"{run_dir}: not a bottleneck-adapter run (model.peft.method is {cfg.model.peft.method}); "
            "export it with --format peft or --format hf"
        )
    return bottleneck.save(read_state(run_dir)["params"], cfg.model.peft, out_dir, base_model=_base_dir(cfg))


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    merge: bool = False,
) -> list[str]:
    """The run's latest checkpoint as config.json + sharded safetensors + index + tokenizer files.

    A PEFT run needs `merge` (its trained part is merged into the base it names)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    method = config_load.load(run_dir / "config.yaml").model.peft.method if (run_dir / "config.yaml").is_file() else ""
    if method in ("adapter", "prefix_tuning", "prompt_tuning"):
        fmt = "adapter" if method == "adapter" else "peft"
        raise ConfigError(
            f"{run_dir} is a {method} run: its trained part cannot be merged into the base's weights; "
            f"export it with --format {fmt}"
        )
    if method not in ("", "none") and not merge:
        hint = "--format peft, or --format hf --merge" if method in ("lora", "dora") else "--format hf --merge"
        raise ConfigError(f"{run_dir} is a {method} run: export it with {hint}")
    loaded = _load_run(run_dir)
    dtype = dtype or loaded.model_cfg.param_dtype
    files = hf.save_pretrained(
        loaded.params, loaded.model_cfg, loaded.vocab_size, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes
    )
    for folder in (run_dir, run_dir / "tokenizer"):
        for name in TOKENIZER_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, out_dir / name)
                files.append(name)
    init_from = config_load.load(run_dir / "config.yaml").model.init_from
    base_dir = init_from.split(":", 1)[1] if init_from.startswith(pretrained.PREFIXES) else None
    files += [
        f
        for f in hf_files.write_chat_files(out_dir, loaded.tokenizer, loaded.template_name, base_dir)
        if f not in files
    ]  # chat template, eos ids, generation_config.json: it chats in transformers
    return files
