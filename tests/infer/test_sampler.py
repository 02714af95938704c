"""Generation: greedy equals `transformers` generate token for token; stops; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft.infer.sampler import Sampling, generate, sample_logits

import hf_tiny

PROMPTS = [[5, 17, 3, 40, 22], [9, 1, 77, 12, 60, 31, 8, 2, 50], [11]]
NEW = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_sampler"))


def hf_greedy(model, prompt, new_tokens):
    import torch

    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens
        )
    return out[0, len(prompt) :].tolist()


# gemma2: its window (3) is shorter than the prompts, so the cache's window mask is exercised.
@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_greedy_equals_transformers_generate(case, root):
    graphdef, params, _, _ = hf_tiny.load(hf_tiny.saved(case, root))
    ours = generate(graphdef, params, PROMPTS, stop_ids=[], sampling=Sampling(max_new_tokens=NEW))
    model = hf_tiny.hf_model(case)
    expected = [hf_greedy(model, p, NEW) for p in PROMPTS]
    assert ours == expected
    assert len({tuple(x) for x in ours}) == len(PROMPTS)


def test_stops_at_the_stop_id_and_other_rows_go_on(root):
    graphdef, params, _, _ = hf_tiny.load(hf_tiny.saved("llama", root))
    free = generate(graphdef, params, PROMPTS, stop_ids=[], sampling=Sampling(max_new_tokens=NEW))
    stop = free[0][3]
    stopped = generate(graphdef, params, PROMPTS, stop_ids=[stop], sampling=Sampling(max_new_tokens=NEW))
    assert stopped[0] == free[0][: free[0].index(stop)]
    for full, cut in zip(free[1:], stopped[1:]):
        assert cut == (full[: full.index(stop)] if stop in full else full)


def test_top_k_and_top_p_keep_only_the_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top_k = np.asarray(sample_logits(logits, keys, Sampling(temperature=1.0, top_k=2)))
    assert set(top_k.tolist()) == {0, 1}
    np.testing.assert_allclose(np.mean(top_k == 0), 0.5 / 0.8, atol=0.04)
    top_p = np.asarray(sample_logits(logits, keys, Sampling(temperature=1.0, top_p=0.9)))
    assert set(top_p.tolist()) == {0, 1, 2}  # 0.5 + 0.3 < 0.9 needs the third; never the fourth
    greedy = np.asarray(sample_logits(logits, keys, Sampling()))
    assert (greedy == 0).all()


def test_sampling_with_a_seed_is_reproducible(root):
    graphdef, params, _, _ = hf_tiny.load(hf_tiny.saved("llama", root))
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.95, max_new_tokens=NEW, seed=3)
    first = generate(graphdef, params, PROMPTS, [], sampling)
    assert first == generate(graphdef, params, PROMPTS, [], sampling)
    assert all(len(x) == NEW for x in first)
