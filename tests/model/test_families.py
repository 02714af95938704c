"""Every family against `transformers` on the same random weights (float32, CPU torch).

One batch per family: row 0 packs three examples, rows 1-3 hold the same examples alone,
right-padded. The lone rows must equal Hugging Face's logits; the packed row must equal
the lone rows. Windows (3 tokens) are shorter than the examples, so they matter.
"""

import numpy as np
import pytest

import hf_tiny

LENGTHS = (5, 9, 6)
TOLERANCE = 1e-4


def batch():
    rng = np.random.default_rng(0)
    examples = [rng.integers(0, hf_tiny.VOCAB, n).astype(np.int32) for n in LENGTHS]
    width = sum(LENGTHS) + 2  # trailing padding on the packed row too
    tokens = np.zeros((4, width), np.int32)
    positions, segment_ids = np.zeros_like(tokens), np.zeros_like(tokens)
    start = 0
    for i, ex in enumerate(examples, 1):
        n = len(ex)
        tokens[0, start : start + n], positions[0, start : start + n], segment_ids[0, start : start + n] = (
            ex,
            range(n),
            i,
        )
        tokens[i, :n], positions[i, :n], segment_ids[i, :n] = ex, range(n), 1
        start += n
    return tokens, positions, segment_ids


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_families"))


@pytest.mark.parametrize("case", list(hf_tiny.CASES))
def test_logits_equal_transformers_and_packing_is_invisible(case, root):
    path = hf_tiny.saved(case, root)
    graphdef, params, cfg, vocab = hf_tiny.load(path)
    tokens, positions, segment_ids = batch()
    ours = np.asarray(hf_tiny.forward(graphdef, params, tokens, positions, segment_ids))
    reference = hf_tiny.hf_logits(hf_tiny.hf_model(case), tokens[1:], segment_ids[1:] > 0)
    valid = segment_ids[1:] > 0
    assert np.abs(reference[valid]).max() > 1.0  # the tolerance is tight relative to the logits
    diff = np.abs(ours[1:][valid] - reference[valid]).max()
    print(f"{case}: max abs diff vs transformers {diff:.2e}")
    assert diff <= TOLERANCE, diff
    start = 0
    for i, n in enumerate(LENGTHS, 1):
        np.testing.assert_allclose(ours[0, start : start + n], ours[i, :n], atol=TOLERANCE, rtol=0)
        start += n


def test_window_and_caps_change_the_output(root):
    """The sliding window and soft-caps are live: turning them off moves the logits."""
    import dataclasses

    from flax import nnx

    from jaxsft.model.transformer import Transformer

    graphdef, params, cfg, vocab = hf_tiny.load(hf_tiny.saved("gemma2", root))
    tokens, positions, segment_ids = batch()
    base = np.asarray(hf_tiny.forward(graphdef, params, tokens, positions, segment_ids))
    for change in (dict(sliding_window=0), dict(attn_logit_softcap=0.0), dict(final_logit_softcap=0.0)):
        other = dataclasses.replace(cfg, **change)
        other_graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(other, vocab, rngs=nnx.Rngs(0))))
        moved = np.asarray(hf_tiny.forward(other_graphdef, params, tokens, positions, segment_ids))
        assert np.abs(moved - base)[segment_ids > 0].max() > 1e-3, change
