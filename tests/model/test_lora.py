"""LoRA and DoRA: math against float64 numpy, branch == merged weights, exact start, counts, HF PEFT parity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.model import hf_peft, lora, lora_branch
from jaxsft.model.transformer import Transformer

import hf_tiny


def _random_adapters(params, cfg, seed=1):
    """A from init, B random (not zero) so the adapters change the model."""
    adapters = lora.init_adapters(params, cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 16))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            0.3 * jax.random.normal(next(keys), x.shape)
            if path[-1].key == "b"
            else x * (1 + 0.2 * jax.random.normal(next(keys), x.shape))
            if path[-1].key == "m"
            else x
        ),
        adapters,
    )


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_a_float64_reference(rslora):
    cfg = PeftConfig(method="lora", rank=3, alpha=5.0, targets=("q", "o", "down"), rslora=rslora)
    rng = np.random.default_rng(0)
    params = {
        "blocks": {
            "attn": {"q_proj": rng.normal(size=(2, 8, 4, 2)), "o_proj": rng.normal(size=(2, 4, 2, 8))},
            "mlp": {"down_proj": rng.normal(size=(2, 16, 8))},
        }
    }
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
        assert a.shape[1:-1] == w.shape[1 : 1 + n_in] and b.shape[2:] == w.shape[1 + n_in :]
        np.testing.assert_allclose(np.asarray(merged["blocks"][group][name]), expected, rtol=1e-5, atol=1e-5)
    assert merged["blocks"]["attn"].keys() == params["blocks"]["attn"].keys()


def test_llama_2_7b_rank_8_on_q_v_trains_the_published_count():
    cfg = PeftConfig(method="lora", rank=8, targets=("q", "v"))
    assert lora.count(ModelConfig(preset="llama-2-7b"), 32000, cfg) == (4_194_304, 6_742_609_920)


def test_targets_by_name_all_linear_and_regex():
    assert len(lora.target_paths(PeftConfig(method="lora", targets=("all-linear",)))) == 7
    assert lora.target_paths(PeftConfig(method="lora", targets=(r"mlp/(up|down)",))) == (
        "blocks/mlp/up_proj",
        "blocks/mlp/down_proj",
    )
    assert lora.target_paths(PeftConfig(method="lora", targets=("q", "q_proj"))) == ("blocks/attn/q_proj",)
    with pytest.raises(ConfigError, match="model.peft.targets: 'norm' matches none"):
        lora.target_paths(PeftConfig(method="lora", targets=("norm",)))
    with pytest.raises(ConfigError, match="model.peft.targets: '\\(' is neither"):
        lora.target_paths(PeftConfig(method="lora", targets=("(",)))


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
    cfg = PeftConfig(method="lora", targets=("all-linear",))
    merged = lora.merge(params, lora.init_adapters(params, cfg, jax.random.key(0)), cfg)
    np.testing.assert_array_equal(
        hf_tiny.forward(graphdef, merged, *_inputs()), hf_tiny.forward(graphdef, params, *_inputs())
    )


def _adapted(graphdef_cfg, vocab, params, adapters, cfg, inputs, key=None):
    """Logits of the model running the adapters as a branch inside its layer scan (training path)."""
    model_cfg = dataclasses.replace(graphdef_cfg, peft=cfg)
    graphdef = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, vocab, rngs=nnx.Rngs(0))))[0]
    fn = lambda p, a, *x: nnx.merge(graphdef, p)(*x, [(p["blocks"], a["blocks"])], key)  # noqa: E731
    return jax.jit(fn)(params, adapters, *inputs)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapted_model_equals_the_merged_model(root, method):
    """Adapters as an x @ A @ B branch (training) == merged weights (export), LoRA and DoRA."""
    graphdef, params, model_cfg, vocab = hf_tiny.load(hf_tiny.saved("qwen2", root))
    cfg = PeftConfig(method=method, rank=4, targets=("all-linear",))
    adapters = _random_adapters(params, cfg)
    adapted = _adapted(model_cfg, vocab, params, adapters, cfg, _inputs())
    merged = hf_tiny.forward(graphdef, lora.merge(params, adapters, cfg), *_inputs())
    base = hf_tiny.forward(graphdef, params, *_inputs())
    assert np.abs(np.asarray(merged) - np.asarray(base)).max() > 1e-2
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(merged), rtol=2e-5, atol=2e-5)


def test_dora_merge_matches_a_float64_reference():
    cfg = PeftConfig(method="dora", rank=2, alpha=3.0, targets=("o", "up"))
    rng = np.random.default_rng(0)
    params = {
        "blocks": {"attn": {"o_proj": rng.normal(size=(2, 4, 2, 8))}, "mlp": {"up_proj": rng.normal(size=(2, 8, 16))}}
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    adapters = _random_adapters(params, cfg)
    merged = lora.merge(params, adapters, cfg)
    for group, name, n_in in (("attn", "o_proj", 2), ("mlp", "up_proj", 1)):
        w = np.asarray(params["blocks"][group][name], np.float64)
        node = {k: np.asarray(v, np.float64) for k, v in adapters["blocks"][group][name].items()}
        for i in range(2):
            v = w[i] + 1.5 * np.tensordot(node["a"][i], node["b"][i], axes=([n_in], [0]))
            norm = np.sqrt((v**2).sum(axis=tuple(range(n_in))))
            np.testing.assert_allclose(
                np.asarray(merged["blocks"][group][name][i]), v * node["m"][i] / norm, rtol=1e-5, atol=1e-5
            )
    # m starts at ||W||: fresh DoRA adapters leave the weights as they are.
    fresh = lora.merge(params, lora.init_adapters(params, cfg, jax.random.key(0)), cfg)
    np.testing.assert_allclose(
        np.asarray(fresh["blocks"]["mlp"]["up_proj"]),
        np.asarray(params["blocks"]["mlp"]["up_proj"]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_dropout_drops_the_branch_input_with_the_step_key():
    """y = x W + s (drop(x) A) B: the branch sees x masked and rescaled by 1/(1-p); x W does not."""
    cfg = PeftConfig(method="lora", rank=2, alpha=2.0, dropout=0.5, targets=("q",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 4, 2)), jnp.float32)
    node = {
        "a": jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(2, 4, 2)), jnp.float32),
    }
    y = jnp.einsum("btd,dnh->btnh", x, w)
    key = jax.random.key(7)
    out = lora_branch.layer_hook({"attn": {"q_proj": node}}, cfg, key)("attn/q_proj", x, w, y)
    keep = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, x.shape))
    dropped = np.where(keep, np.asarray(x) * 2.0, 0.0)
    expected = np.asarray(y) + np.einsum("btd,dr,rnh->btnh", dropped, node["a"], node["b"])
    assert 0 < keep.mean() < 1
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    no_key = lora_branch.layer_hook({"attn": {"q_proj": node}}, cfg, None)("attn/q_proj", x, w, y)  # eval: no dropout
    np.testing.assert_allclose(
        np.asarray(no_key), np.asarray(y) + np.einsum("btd,dr,rnh->btnh", x, node["a"], node["b"]), rtol=1e-5, atol=1e-5
    )


def test_dora_count_adds_one_magnitude_per_output_feature():
    cfg = PeftConfig(method="dora", rank=8, targets=("q", "v"))
    trainable, total = lora.count(ModelConfig(preset="llama-2-7b"), 32000, cfg)
    assert trainable == 4_194_304 + 32 * (4096 + 4096)
    assert total == 6_738_415_616 + trainable


@pytest.mark.parametrize(
    "case,rslora,method", [("llama", False, "lora"), ("qwen2", True, "lora"), ("llama", False, "dora")]
)
def test_peft_loads_our_adapters_with_equal_logits(root, tmp_path, case, rslora, method):
    from peft import PeftModel

    path = hf_tiny.saved(case, root)
    graphdef, params, _, _ = hf_tiny.load(path)
    cfg = PeftConfig(method=method, rank=4, alpha=8.0, targets=("all-linear",), rslora=rslora)
    adapters = _random_adapters(params, cfg)
    ours = np.asarray(hf_tiny.forward(graphdef, lora.merge(params, adapters, cfg), *_inputs()))
    hf_peft.save_peft(adapters, cfg, tmp_path, base_model=str(path))
    peft_model = PeftModel.from_pretrained(hf_tiny.hf_model(case), tmp_path).eval()
    tokens, _, mask = _inputs()
    theirs = hf_tiny.hf_logits(peft_model, tokens, mask)
    base = hf_tiny.hf_logits(hf_tiny.hf_model(case), tokens, mask)
    assert np.abs(theirs - base).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(ours, theirs, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapters_import_with_equal_logits_and_round_trip(root, tmp_path, dora):
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    path = hf_tiny.saved("llama", root)
    graphdef, params, _, _ = hf_tiny.load(path)
    peft_model = get_peft_model(
        hf_tiny.hf_model("llama"),
        PeftLoraConfig(
            r=4, lora_alpha=6, target_modules=["q_proj", "o_proj", "up_proj"], lora_dropout=0.0, use_dora=dora
        ),
    ).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
            if "lora_magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    cfg, adapters = hf_peft.load_peft(tmp_path / "peft", params)
    assert (cfg.method, cfg.rank, cfg.alpha, sorted(cfg.targets)) == (
        "dora" if dora else "lora",
        4,
        6.0,
        ["o", "q", "up"],
    )
    tokens, _, mask = _inputs()
    ours = hf_tiny.forward(graphdef, lora.merge(params, adapters, cfg), *_inputs())
    np.testing.assert_allclose(np.asarray(ours), hf_tiny.hf_logits(peft_model, tokens, mask), rtol=2e-4, atol=2e-4)
    hf_peft.save_peft(adapters, cfg, tmp_path / "again")
    _, again = hf_peft.load_peft(tmp_path / "again", params)
    jax.tree.map(np.testing.assert_array_equal, adapters, again)
