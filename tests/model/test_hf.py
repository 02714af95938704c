"""Hugging Face import/export: errors name the problem, sharded placement, exact round trips."""

import json

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from safetensors.numpy import save_file

from jaxsft.config import ConfigError, LogicalRules
from jaxsft.model import hf
from jaxsft.model.safetensors_io import TensorIndex

import hf_tiny


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_io"))


def _rewrite(src, dst, tensors: dict, config_change=None):
    """A copy of `src` holding `tensors` (name -> array) instead of its own tensors."""
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    config.update(config_change or {})
    (dst / "config.json").write_text(json.dumps(config))
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, dst / "model.safetensors")
    return dst


def _tensors(path):
    index = TensorIndex(path)
    return {name: index.read(name) for name in index.tensors}


def _load_error(path):
    cfg, vocab = hf.load_config(path)
    with pytest.raises(ConfigError) as e:
        hf.load_params(path, cfg, vocab, hf_tiny.replicated(cfg, vocab))
    return str(e.value)


def test_unknown_architecture_lists_the_supported_ones(root, tmp_path):
    src = hf_tiny.saved("llama", root)
    bad = _rewrite(src, tmp_path / "gpt2", _tensors(src), {"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(
        ConfigError,
        match=r"GPT2LMHeadModel.*not supported; supported: LlamaForCausalLM, "
        r"MistralForCausalLM, Qwen2ForCausalLM.*Gemma2ForCausalLM",
    ):
        hf.load_config(bad)


def test_missing_unexpected_shape_and_dtype_errors_name_the_tensor(root, tmp_path):
    src = hf_tiny.saved("llama", root)
    tensors = _tensors(src)
    name = "model.layers.1.mlp.up_proj.weight"
    missing = {k: v for k, v in tensors.items() if k != name}
    assert f"1 missing tensor(s): {name}" in _load_error(_rewrite(src, tmp_path / "missing", missing))
    extra = {**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(4, np.float32)}
    message = _load_error(_rewrite(src, tmp_path / "extra", extra))
    assert "1 unexpected tensor(s): model.layers.0.self_attn.rotary_emb.inv_freq" in message
    shaped = {**tensors, name: tensors[name][:, :-1]}
    assert f"tensor {name} has shape [64, 31], expected [64, 32]" in _load_error(
        _rewrite(src, tmp_path / "shape", shaped)
    )
    typed = {**tensors, name: tensors[name].astype(np.int32)}
    assert f"tensor {name} has dtype I32" in _load_error(_rewrite(src, tmp_path / "dtype", typed))
    assert "\n" not in message


def _plan_shardings(cfg, vocab, mesh, rules):
    from jaxsft.train import state as state_lib

    return state_lib.plan(cfg, vocab, optax.sgd(0.1), rules, mesh).shardings["params"]


def test_import_places_each_tensor_on_the_train_state_sharding(root):
    path = hf_tiny.saved("qwen2", root)
    graphdef, single, cfg, vocab = hf_tiny.load(path)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    shardings = _plan_shardings(cfg, vocab, mesh, LogicalRules())
    sharded = hf.load_params(path, cfg, vocab, shardings)
    assert sharded["blocks"]["attn"]["q_proj"].sharding.spec == shardings["blocks"]["attn"]["q_proj"].spec
    assert "tensor" in str(sharded["blocks"]["mlp"]["gate_proj"].sharding.spec)
    jax.tree.map(lambda a, s: (a.sharding == s) or pytest.fail(f"{a.sharding} != {s}"), sharded, shardings)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(sharded), jax.device_get(single))


@pytest.mark.parametrize("case", list(hf_tiny.CASES))
def test_export_round_trip_gives_identical_transformers_logits(case, root, tmp_path):
    import transformers

    graphdef, params, cfg, vocab = hf_tiny.load(hf_tiny.saved(case, root))
    files = hf.save_pretrained(params, cfg, vocab, tmp_path, max_shard_bytes=40_000)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert (tmp_path / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    tokens = np.random.default_rng(0).integers(0, vocab, (2, 12))
    mask = np.ones_like(tokens)
    original = hf_tiny.hf_logits(hf_tiny.hf_model(case), tokens, mask)
    np.testing.assert_array_equal(hf_tiny.hf_logits(reloaded.float().eval(), tokens, mask), original)


def test_convert_to_orbax_restores_the_same_params(root, tmp_path):
    from jaxsft.cli import main
    from jaxsft.config import ModelConfig
    from jaxsft.model import pretrained

    path = hf_tiny.saved("gemma2", root)
    _, direct, cfg, vocab = hf_tiny.load(path)
    assert main(["convert", f"hf:{path}", str(tmp_path / "conv")]) == 0
    init_from = f"orbax:{tmp_path / 'conv'}"
    resolved = pretrained.resolve_config(ModelConfig(init_from=init_from))
    assert resolved == cfg.__class__(**{**cfg.__dict__, "init_from": init_from})
    restored = pretrained.load_pretrained(resolved, vocab, hf_tiny.replicated(cfg, vocab))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(direct))


def test_init_from_rejects_a_conflicting_shape(root):
    from jaxsft.config import ModelConfig
    from jaxsft.model import pretrained

    path = hf_tiny.saved("llama", root)
    same = pretrained.resolve_config(ModelConfig(init_from=f"hf:{path}", d_model=32, dtype="bfloat16"))
    assert (same.d_model, same.dtype, same.vocab_size) == (32, "bfloat16", hf_tiny.VOCAB)
    with pytest.raises(ConfigError, match=r"model.n_layers=3 conflicts with .*config.json \(2\)"):
        pretrained.resolve_config(ModelConfig(init_from=f"hf:{path}", n_layers=3))


def test_bfloat16_checkpoint_imports_exactly_and_exports_bfloat16(root, tmp_path):
    import torch
    import transformers

    model = hf_tiny.hf_model("qwen3").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert TensorIndex(tmp_path / "bf16").tensors["model.embed_tokens.weight"].dtype == "BF16"
    _, params, cfg, vocab = hf_tiny.load(tmp_path / "bf16")
    assert params["embedding"].dtype == np.float32  # cast to param_dtype on the device
    expected = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
    np.testing.assert_array_equal(hf.to_hf("in_heads", np.asarray(params["blocks"]["attn"]["q_proj"][1])), expected)
    hf.save_pretrained(params, cfg, vocab, tmp_path / "out", dtype="bfloat16")
    assert TensorIndex(tmp_path / "out").tensors["model.embed_tokens.weight"].dtype == "BF16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
