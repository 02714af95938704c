"""Prefix and prompt tuning: logits equal Hugging Face PEFT's both ways, packing stays exact,
generation equals PEFT's greedy generate, counts are PEFT's, bad combinations get one line."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft.config import ConfigError, ModelConfig, PeftConfig
from jaxsft.infer.sampler import Sampling, generate
from jaxsft.model import adapted, hf_prompt, peft, prompts

import hf_tiny

SLOW = pytest.mark.slow  # the plain suite keeps one case of each property; `-m slow` runs the rest
W = 3  # virtual tokens
PROMPTS, NEW = [[5, 17, 3, 40, 22], [9, 1, 77, 12, 60, 31, 8, 2, 50], [11]], 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prompts_hf"))


def _inputs(rows=2, length=10, seed=0):
    tokens = np.random.default_rng(seed).integers(0, hf_tiny.VOCAB, (rows, length)).astype(np.int32)
    positions = np.tile(np.arange(length, dtype=np.int32), (rows, 1))
    return tokens, positions, np.ones_like(tokens)


@jax.jit
def _noise(trainable, key):
    """Trained-looking params: init plus noise, so every number matters."""
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _ours(case, root, cfg, trainable=None):
    """(logits fn, graphdef, params, trainable) of the tiny HF model `case` with `cfg`'s trained part."""
    _, base, model_cfg, vocab = hf_tiny.load(hf_tiny.saved(case, root))
    if trainable is None:
        trainable = _noise(peft.init(cfg, base, jax.random.key(1))[0], jax.random.key(2))
    graphdef, params = adapted.build(model_cfg, vocab, cfg, base, trainable)
    return (lambda *x: np.asarray(hf_tiny.forward(graphdef, params, *x))), graphdef, params, trainable


def _dims(case, root):
    _, _, m, _ = hf_tiny.load(hf_tiny.saved(case, root))
    return m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim


PREFIX = PeftConfig(method="prefix_tuning", num_virtual_tokens=W)
PROJECTED = dataclasses.replace(PREFIX, prefix_projection=True, prefix_hidden=24)
PROMPT = PeftConfig(method="prompt_tuning", num_virtual_tokens=W)


def _peft_logits(model, tokens, cfg):
    logits = hf_tiny.hf_logits(model, tokens, np.ones_like(tokens))
    return logits[:, W:] if cfg.method == "prompt_tuning" else logits  # PEFT returns the virtual tokens' too


@pytest.mark.parametrize(
    "case,cfg",
    [
        ("llama", PREFIX),
        pytest.param("qwen3", PREFIX, marks=SLOW),
        pytest.param("gemma", PROJECTED, marks=SLOW),
        pytest.param("llama", PROMPT, marks=SLOW),
        ("gemma", PROMPT),
    ],
    ids=["prefix-llama", "prefix-qwen3", "projected-gemma", "prompt-llama", "prompt-gemma"],
)
def test_peft_loads_our_export_with_equal_logits(root, tmp_path, case, cfg):
    from peft import PeftModel

    ours, *_, trainable = _ours(case, root, cfg)
    hf_prompt.save(cfg, trainable, tmp_path, _dims(case, root), base_model=str(hf_tiny.saved(case, root)))
    peft_model = PeftModel.from_pretrained(hf_tiny.hf_model(case), tmp_path).eval()
    tokens, positions, segments = _inputs()
    theirs = _peft_logits(peft_model, tokens, cfg)
    base = hf_tiny.hf_logits(hf_tiny.hf_model(case), tokens, segments)
    assert np.abs(theirs - base).max() > 1e-2  # the prefix matters
    np.testing.assert_allclose(ours(tokens, positions, segments), theirs, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("method", ["prefix_tuning", pytest.param("prompt_tuning", marks=SLOW)])
def test_a_peft_adapter_imports_with_equal_logits_and_round_trips(root, tmp_path, method):
    import torch
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    make = PrefixTuningConfig if method == "prefix_tuning" else PromptTuningConfig
    torch.manual_seed(3)
    peft_model = get_peft_model(hf_tiny.hf_model("qwen2"), make(task_type="CAUSAL_LM", num_virtual_tokens=W)).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    _, base, _, _ = hf_tiny.load(hf_tiny.saved("qwen2", root))
    cfg = PeftConfig(method=method, num_virtual_tokens=W)
    trainable = peft.load(cfg, tmp_path / "peft", base)
    ours, *_ = _ours("qwen2", root, cfg, trainable)
    tokens, positions, segments = _inputs()
    np.testing.assert_allclose(
        ours(tokens, positions, segments), _peft_logits(peft_model, tokens, cfg), rtol=2e-4, atol=2e-4
    )
    hf_prompt.save(cfg, trainable, tmp_path / "again", _dims("qwen2", root))
    jax.tree.map(np.testing.assert_array_equal, trainable, peft.load(cfg, tmp_path / "again", base))
    with pytest.raises(ConfigError, match="num_virtual_tokens=3; set model.peft.method, num_virtual_tokens to match"):
        peft.load(dataclasses.replace(cfg, num_virtual_tokens=4), tmp_path / "peft", base)


def _packed(model_fn, lengths=(5, 7, 4), width=20, seed=0):
    """One packed row of len(lengths) segments (trailing padding) vs each segment alone."""
    tokens = np.random.default_rng(seed).integers(0, hf_tiny.VOCAB, (1, width)).astype(np.int32)
    positions, segments, start = np.zeros_like(tokens), np.zeros_like(tokens), 0
    for s, n in enumerate(lengths, 1):
        positions[0, start : start + n], segments[0, start : start + n] = np.arange(n), s
        start += n
    packed, start = model_fn(tokens, positions, segments), 0
    for n in lengths:
        alone = model_fn(tokens[:, start : start + n], positions[:, start : start + n], np.ones((1, n), np.int32))
        np.testing.assert_allclose(packed[0, start : start + n], alone[0], rtol=1e-5, atol=1e-5)
        start += n
    assert np.isfinite(packed).all()


@pytest.mark.parametrize(
    "cfg",
    [pytest.param(PREFIX, marks=SLOW), pytest.param(PROJECTED, marks=SLOW), PROMPT],
    ids=["prefix", "projected", "prompt"],
)
def test_every_segment_of_a_packed_row_sees_the_prefix(root, cfg):
    ours, *_ = _ours("llama", root, cfg)
    _packed(ours)


def _greedy_by_forward(model, prompt: list[int], new: int) -> list[int]:
    """Greedy decoding by a full forward per token: `PeftModel.generate` with peft 0.21.2 and
    transformers 5.24 drops the prefix (its output is the base model's), its forward does not."""
    seq = list(prompt)
    for _ in range(new):
        tokens = np.asarray([seq])
        seq.append(int(np.argmax(hf_tiny.hf_logits(model, tokens, np.ones_like(tokens))[0, -1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("cfg", [PREFIX, pytest.param(PROMPT, marks=SLOW)], ids=["prefix", "prompt"])
def test_greedy_generation_equals_peft_greedy_decoding(root, tmp_path, cfg):
    from peft import PeftModel

    _, graphdef, params, trainable = _ours("llama", root, cfg)
    ours = generate(graphdef, params, PROMPTS, stop_ids=[], sampling=Sampling(max_new_tokens=NEW))
    hf_prompt.save(cfg, trainable, tmp_path, _dims("llama", root))
    peft_model = PeftModel.from_pretrained(hf_tiny.hf_model("llama"), tmp_path).eval()
    assert ours == [_greedy_by_forward(peft_model, p, NEW) for p in PROMPTS]
    graphdef_base, base, _, _ = hf_tiny.load(hf_tiny.saved("llama", root))
    assert ours != generate(graphdef_base, base, PROMPTS, stop_ids=[], sampling=Sampling(max_new_tokens=NEW))


def test_prompt_init_text_repeats_its_ids_and_random_init_takes_vocabulary_rows(root):
    _, base, model_cfg, _ = hf_tiny.load(hf_tiny.saved("gemma", root))
    cfg = dataclasses.replace(PROMPT, num_virtual_tokens=5)
    scale = prompts.embed_scale(model_cfg)  # Gemma's inputs are its embeddings times sqrt(D), PEFT's prompts too
    assert scale == np.sqrt(32)
    prompt = peft.init(cfg, base, jax.random.key(0), (7, 8), scale)[0]["prompt"]
    table = np.asarray(base["embedding"]) * np.float32(scale)
    np.testing.assert_array_equal(prompt, table[[7, 8, 7, 8, 7]])
    rows = np.asarray(peft.init(cfg, base, jax.random.key(0), (), scale)[0]["prompt"])
    assert all(any(np.array_equal(r, t) for t in table) for r in rows)


def test_counts_are_the_ones_peft_prints():
    """PEFT's print_trainable_parameters on a Llama of these shapes (checked by hand below)."""
    model = ModelConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64)
    total = peft.count(model, 96)[0]
    kv = 2 * 8  # K * H: PEFT's token_dim for prefixes under grouped-query attention
    assert peft.count(dataclasses.replace(model, peft=PREFIX), 96) == (W * 2 * 2 * kv, total + W * 2 * 2 * kv)
    projected = W * kv + (kv * 24 + 24) + (24 * 2 * 2 * kv + 2 * 2 * kv)
    assert peft.count(dataclasses.replace(model, peft=PROJECTED), 96)[0] == projected
    assert peft.count(dataclasses.replace(model, peft=PROMPT), 96)[0] == W * 32
    # Llama-3.1-8B, 20 virtual tokens: 32 layers x (k, v) x 8 kv heads x 128 per token.
    big = ModelConfig(preset="llama-3.1-8b", peft=PeftConfig(method="prefix_tuning"))
    assert peft.count(big, 128256)[0] == 20 * 32 * 2 * 1024


def test_a_prefix_with_a_kernel_or_a_window_is_refused_in_one_line():
    from jaxsft import config_load

    for overrides, words in (
        (["model.peft.method=prefix_tuning", "model.attention=splash"], "the splash kernel cannot take a prefix"),
        (["model.peft.method=prompt_tuning", "model.sliding_window=8"], "sliding-window attention"),
    ):
        with pytest.raises(ConfigError, match=words) as info:
            config_load.load(None, overrides)
        assert "\n" not in str(info.value)
    # A preset's window, known only once the preset is applied.
    with pytest.raises(ConfigError, match="model.sliding_window=4096"):
        peft.check(ModelConfig(preset="mistral-7b", peft=PeftConfig(method="prefix_tuning")))


def test_prefix_keys_are_used_as_given_and_real_tokens_start_at_w(root):
    """Prefix keys skip rotary and k-norm (PEFT's past_key_values); the tokens' positions are W + p:
    a prefix equal to the real tokens' first W keys/values gives the same logits as those tokens."""
    graphdef, base, model_cfg, vocab = hf_tiny.load(hf_tiny.saved("qwen3", root))
    tokens, positions, segments = _inputs(rows=1, length=8)
    model = nnx.merge(graphdef, base)
    full = np.asarray(model(tokens, positions, segments))
    kv = model.virtual_kv(jnp.take(base["embedding"], tokens[0, :W], axis=0))
    rest = model(tokens[:, W:], positions[:, W:] - W, segments[:, W:], prefix=kv)
    np.testing.assert_allclose(np.asarray(rest), full[:, W:], rtol=1e-5, atol=1e-5)
