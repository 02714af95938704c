"""Invariant 1 end to end: from packed train batches back to the assistant's words.

For every packed segment of real train batches, the targets with a non-zero loss
weight, split into contiguous runs, are each one assistant message followed by the
end-of-turn marker, and the runs of a segment are exactly the assistant messages of one
source conversation, in order, character for character.
"""

import dataclasses

import numpy as np

from jaxsft.config import DataConfig
from jaxsft.data import synthetic
from jaxsft.data.pipeline import build_data
from jaxsft.data.templates import end_of_turn_id

CFG = DataConfig(synthetic_train_examples=300, synthetic_eval_examples=16, max_length=256)


def _runs(mask):
    """(start, stop) of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_trained_targets_decode_to_the_assistant_messages(tmp_path):
    data = build_data(CFG, seed=0, cache_dir=tmp_path)
    tok, eot = data.tokenizer, end_of_turn_id(data.tokenizer)
    conversations = {
        tuple(m["content"] for m in r["messages"] if m["role"] == "assistant")
        for r in synthetic.generate(CFG.synthetic_train_examples, 0, "train")
    }
    iterator = iter(data.train_dataset(8, seed=0))
    segments = 0
    for _ in range(6):
        batch = next(iterator)
        for row in range(batch["inputs"].shape[0]):
            seg_ids = batch["segment_ids"][row]
            for seg in np.unique(seg_ids[seg_ids > 0]):
                cols = np.flatnonzero(seg_ids == seg)
                targets, weights = batch["targets"][row, cols], batch["loss_weights"][row, cols]
                answers = []
                for start, stop in _runs(weights > 0):
                    assert targets[stop - 1] == eot  # every trained run ends with the end-of-turn marker
                    answers.append(tok.decode(targets[start : stop - 1].tolist()))
                assert tuple(answers) in conversations
                segments += 1
    iterator.close()
    assert segments > 48  # packing put several examples in each of the 48 rows


def test_best_fit_packs_one_epoch_of_a_small_dataset_at_a_time(tmp_path):
    """300 examples over 8 virtual shards: a window of 256 (the floor), not 4,096 examples (14 epochs)."""
    data = build_data(CFG, seed=0, cache_dir=tmp_path)
    examples = sum(len(p) for p in data.pools)
    assert data.pack_window(8) == 256 and data.pack_window(1) == examples
    big = dataclasses.replace(data, pools=[np.arange(100_000)])
    assert big.pack_window(8) == 4096


def test_untrained_messages_do_not_change_which_targets_train(tmp_path):
    """Rewriting system and user text changes inputs but never the trained targets' text."""
    data = build_data(dataclasses.replace(CFG, synthetic_train_examples=40), seed=0, cache_dir=tmp_path)
    from jaxsft.data.formats import Message
    from jaxsft.data.templates import render

    messages = [Message("system", "Be brief."), Message("user", "Reverse: a b c"), Message("assistant", "c b a")]
    louder = [
        Message("system", "BE VERY BRIEF <|im_start|>"),
        Message("user", "Reverse these: a b c ?"),
        Message("assistant", "c b a"),
    ]
    for variant in (messages, louder):
        ids, weights = render(variant, data.tokenizer)
        trained = ids[weights > 0]
        assert data.tokenizer.decode(trained[:-1].tolist()) == "c b a"
        assert trained[-1] == end_of_turn_id(data.tokenizer)
