"""LoRA math against float64 numpy, exact start at the base, counts, targets, HF PEFT parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from jaxsft.config import ConfigError, LoraConfig, ModelConfig
from jaxsft.model import lora


def _random_adapters(params, cfg, seed=1):
    """A from init, B random (not zero) so the adapters change the model."""
    adapters = lora.init_adapters(params, cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * jax.random.normal(next(keys), x.shape) if path[-1].key == "b" else x, adapters)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_a_float64_reference(rslora):
    cfg = LoraConfig(enabled=True, rank=3, alpha=5.0, targets=("q", "o", "down"), rslora=rslora)
    rng = np.random.default_rng(0)
    params = {"blocks": {"attn": {"q_proj": rng.normal(size=(2, 8, 4, 2)), "o_proj": rng.normal(size=(2, 4, 2, 8))},
                         "mlp": {"down_proj": rng.normal(size=(2, 16, 8))}}}
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    adapters = _random_adapters(params, cfg)
    merged = lora.merge(params, adapters, cfg)
    s = 5.0 / (np.sqrt(3) if rslora else 3)
    for path, n_in in (("attn/q_proj", 1), ("attn/o_proj", 2), ("mlp/down_proj", 1)):
        group, name = path.split("/")
        w = np.asarray(params["blocks"][group][name], np.float64)
        a = np.asarray(adapters["blocks"][group][name]["a"], np.float64)
        b = np.asarray(adapters["blocks"][group][name]["b"], np.float64)
        expected = np.stack([w[i] + s * np.tensordot(a[i], b[i], axes=([a.ndim - 2], [0])) for i in range(2)])
        assert a.shape[1:-1] == w.shape[1:1 + n_in] and b.shape[2:] == w.shape[1 + n_in:]
        np.testing.assert_allclose(np.asarray(merged["blocks"][group][name]), expected, rtol=1e-5, atol=1e-5)
    assert merged["blocks"]["attn"].keys() == params["blocks"]["attn"].keys()


def test_llama_2_7b_rank_8_on_q_v_trains_the_published_count():
    cfg = LoraConfig(enabled=True, rank=8, targets=("q", "v"))
    assert lora.count(ModelConfig(preset="llama-2-7b"), 32000, cfg) == (4_194_304, 6_742_609_920)


def test_targets_by_name_all_linear_and_regex():
    assert len(lora.target_paths(LoraConfig(targets=("all-linear",)))) == 7
    assert lora.target_paths(LoraConfig(targets=(r"mlp/(up|down)",))) == ("blocks/mlp/up_proj", "blocks/mlp/down_proj")
    assert lora.target_paths(LoraConfig(targets=("q", "q_proj"))) == ("blocks/attn/q_proj",)
    with pytest.raises(ConfigError, match="lora.targets: 'norm' matches none"):
        lora.target_paths(LoraConfig(targets=("norm",)))
    with pytest.raises(ConfigError, match="lora.targets: '\\(' is neither"):
        lora.target_paths(LoraConfig(targets=("(",)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("lora_hf"))


def _inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, hf_tiny.VOCAB, (2, 12)).astype(np.int32)
    positions = np.tile(np.arange(12, dtype=np.int32), (2, 1))
    return tokens, positions, np.ones_like(tokens)


def test_fresh_adapters_leave_the_model_exactly_at_the_base(root):
    graphdef, params, _, _ = hf_tiny.load(hf_tiny.saved("llama", root))
    cfg = LoraConfig(enabled=True, targets=("all-linear",))
    merged = lora.merge(params, lora.init_adapters(params, cfg, jax.random.key(0)), cfg)
    np.testing.assert_array_equal(hf_tiny.forward(graphdef, merged, *_inputs()),
                                  hf_tiny.forward(graphdef, params, *_inputs()))


def test_adapted_model_equals_the_merged_model(root):
    """Adapters merged per layer inside the scan (training) == merged weights (export)."""
    from flax import nnx

    graphdef, params, _, _ = hf_tiny.load(hf_tiny.saved("qwen2", root))
    cfg = LoraConfig(enabled=True, rank=4, targets=("all-linear",))
    adapters = _random_adapters(params, cfg)
    adapted = jax.jit(lambda p, a, *x: nnx.merge(graphdef, p)(*x, a["blocks"], cfg))(params, adapters, *_inputs())
    merged = hf_tiny.forward(graphdef, lora.merge(params, adapters, cfg), *_inputs())
    base = hf_tiny.forward(graphdef, params, *_inputs())
    assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case,rslora", [("llama", False), ("qwen2", True)])
def test_peft_loads_our_adapters_with_equal_logits(root, tmp_path, case, rslora):
    from peft import PeftModel

    path = hf_tiny.saved(case, root)
    graphdef, params, _, _ = hf_tiny.load(path)
    cfg = LoraConfig(enabled=True, rank=4, alpha=8.0, targets=("all-linear",), rslora=rslora)
    adapters = _random_adapters(params, cfg)
    ours = np.asarray(hf_tiny.forward(graphdef, lora.merge(params, adapters, cfg), *_inputs()))
    lora.save_peft(adapters, cfg, tmp_path, base_model=str(path))
    peft_model = PeftModel.from_pretrained(hf_tiny.hf_model(case), tmp_path).eval()
    tokens, _, mask = _inputs()
    theirs = hf_tiny.hf_logits(peft_model, tokens, mask)
    base = hf_tiny.hf_logits(hf_tiny.hf_model(case), tokens, mask)
    assert np.abs(theirs - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)


def test_peft_adapters_import_with_equal_logits_and_round_trip(root, tmp_path):
    import torch
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    path = hf_tiny.saved("llama", root)
    graphdef, params, _, _ = hf_tiny.load(path)
    peft_model = get_peft_model(hf_tiny.hf_model("llama"), PeftLoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "o_proj", "up_proj"], lora_dropout=0.0)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    peft_model.save_pretrained(tmp_path / "peft")
    cfg, adapters = lora.load_peft(tmp_path / "peft", params)
    assert (cfg.rank, cfg.alpha, sorted(cfg.targets)) == (4, 6.0, ["o", "q", "up"])
    tokens, _, mask = _inputs()
    ours = hf_tiny.forward(graphdef, lora.merge(params, adapters, cfg), *_inputs())
    np.testing.assert_allclose(np.asarray(ours), hf_tiny.hf_logits(peft_model, tokens, mask), rtol=2e-4, atol=2e-4)
    lora.save_peft(adapters, cfg, tmp_path / "again")
    _, again = lora.load_peft(tmp_path / "again", params)
    jax.tree.map(np.testing.assert_array_equal, adapters, again)
