"""Bottleneck adapters: logits equal a float64 torch reference (forward hooks on a Hugging Face
model), a fresh adapter is the base exactly, counts by hand, files round-trip."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.infer.sampler import Sampling, generate
from jaxsft.model import adapted, bottleneck, peft

import hf_tiny

HOULSBY = PeftConfig(method="adapter", adapter_size=5)
PFEIFFER = dataclasses.replace(HOULSBY, adapter_placement="pfeiffer", adapter_activation="silu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bottleneck_hf"))


def _inputs():
    tokens = np.random.default_rng(0).integers(0, hf_tiny.VOCAB, (2, 12)).astype(np.int32)
    return tokens, np.tile(np.arange(12, dtype=np.int32), (2, 1)), np.ones_like(tokens)


def _trained(cfg, params, seed=1):
    """Fresh adapters with every param moved (up and the biases are zero at init)."""
    adapters = peft.init(cfg, params, jax.random.key(seed))[0]
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _ours(case, root, cfg, adapters=None):
    _, params, model_cfg, vocab = hf_tiny.load(hf_tiny.saved(case, root))
    adapters = _trained(cfg, params) if adapters is None else adapters
    graphdef, both = adapted.build(model_cfg, vocab, cfg, params, adapters)
    return np.asarray(hf_tiny.forward(graphdef, both, *_inputs())), adapters


def _torch_model(case, cfg, adapters):
    """float64 Hugging Face model with h -> h + up(act(down h + b)) + c hooked onto each adapted
    branch's output (after the post-norm where the family has one), before the residual add."""
    import torch

    model = hf_tiny.hf_model(case).double()
    act = {"relu": torch.relu, "silu": torch.nn.functional.silu}[cfg.adapter_activation]
    post = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}

    def hook(node, i):
        w = {k: torch.as_tensor(np.asarray(v[i], np.float64)) for k, v in node.items()}

        def fn(module, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = h + act(h @ w["down"] + w["down_bias"]) @ w["up"] + w["up_bias"]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        return fn

    for i, layer in enumerate(model.model.layers):
        for place in bottleneck.places(cfg):
            module = getattr(layer, post[place], None) if case == "gemma2" else None
            module = module or (layer.self_attn if place == "attn" else layer.mlp)
            module.register_forward_hook(hook(adapters["blocks"][place]["adapter"], i))
    return model


def _torch_reference(case, cfg, adapters):
    return hf_tiny.hf_logits(_torch_model(case, cfg, adapters), *_inputs()[::2])


@pytest.mark.parametrize(
    "case,cfg",
    [
        ("llama", HOULSBY),
        pytest.param("gemma2", HOULSBY, marks=pytest.mark.slow),
        pytest.param("qwen2", PFEIFFER, marks=pytest.mark.slow),
    ],
    ids=["llama", "gemma2", "pfeiffer"],
)
def test_adapted_logits_equal_a_float64_torch_reference(root, case, cfg):
    ours, adapters = _ours(case, root, cfg)
    theirs = _torch_reference(case, cfg, adapters)
    base = hf_tiny.hf_logits(hf_tiny.hf_model(case), *_inputs()[::2])
    assert np.abs(theirs - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_greedy_decoding_of_the_torch_reference(root):
    import torch

    _, params, model_cfg, vocab = hf_tiny.load(hf_tiny.saved("llama", root))
    adapters = _trained(HOULSBY, params)
    graphdef, both = adapted.build(model_cfg, vocab, HOULSBY, params, adapters)
    prompts = [[5, 17, 3, 40, 22], [9, 1, 77, 12, 60, 31, 8, 2, 50], [11]]
    ours = generate(graphdef, both, prompts, stop_ids=[], sampling=Sampling(max_new_tokens=8))
    reference = _torch_model("llama", HOULSBY, adapters)
    expected = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(8):
            with torch.no_grad():
                seq.append(int(reference(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        expected.append(seq[len(prompt) :])
    assert ours == expected


def test_a_fresh_adapter_is_the_base_exactly(root):
    graphdef, params, _, _ = hf_tiny.load(hf_tiny.saved("llama", root))
    ours, _ = _ours("llama", root, HOULSBY, peft.init(HOULSBY, params, jax.random.key(0))[0])
    np.testing.assert_array_equal(ours, np.asarray(hf_tiny.forward(graphdef, params, *_inputs())))


def test_counts_by_hand():
    model = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    per_branch = 32 * 5 + 5 + 5 * 32 + 32
    total = peft.count(model, 96)[0]
    assert peft.count(dataclasses.replace(model, peft=HOULSBY), 96) == (2 * 2 * per_branch, total + 4 * per_branch)
    assert peft.count(dataclasses.replace(model, peft=PFEIFFER), 96)[0] == 2 * per_branch
    # Llama-3.1-8B, Houlsby, size 64: 32 layers x 2 branches x (4096 x 64 x 2 + 64 + 4096).
    big = ModelConfig(preset="llama-3.1-8b", peft=PeftConfig(method="adapter"))
    assert peft.count(big, 128256)[0] == 32 * 2 * (2 * 4096 * 64 + 64 + 4096)


def test_files_round_trip_and_load_back_with_equal_logits(root, tmp_path):
    ours, adapters = _ours("llama", root, HOULSBY)
    _, params, _, _ = hf_tiny.load(hf_tiny.saved("llama", root))
    assert bottleneck.save(adapters, HOULSBY, tmp_path) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.load(HOULSBY, tmp_path, params)
    jax.tree.map(np.testing.assert_array_equal, adapters, loaded)
    np.testing.assert_array_equal(_ours("llama", root, HOULSBY, loaded)[0], ours)
    with pytest.raises(ConfigError, match="adapter_size=5, .*; set model.peft.adapter_size, adapter_placement"):
        peft.load(dataclasses.replace(HOULSBY, adapter_size=6), tmp_path, params)


def test_adapters_cannot_be_merged():
    with pytest.raises(ConfigError, match="cannot be merged into the base's weights"):
        peft.merged(HOULSBY, {}, {})
