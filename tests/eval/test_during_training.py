"""The generation eval the trainer runs at each eval, on the tiny run of conftest.py: its
samples, its logged scores, TensorBoard and the plot, and agreement with `jaxsft eval`."""

import json
from collections import defaultdict

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxsft.eval import metrics
from jaxsft.eval.evaluate import score

pytestmark = pytest.mark.slow
EVAL_STEPS = [0, 20, 40]  # step 0, then train.eval_every=20 of 40 steps


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def samples_by_step(tiny_run):
    by_step = defaultdict(list)
    for sample in _rows(tiny_run / "samples.jsonl"):
        by_step[sample["step"]].append(sample)
    return by_step


def test_the_same_prompts_are_answered_at_every_eval(samples_by_step):
    assert sorted(samples_by_step) == EVAL_STEPS
    wheres = [[s["where"] for s in samples_by_step[step]] for step in EVAL_STEPS]
    assert wheres[0] == wheres[1] == wheres[2] and len(wheres[0]) == 24  # eval.generate_n=32 > 24 records


def test_logged_scores_are_the_samples_recounted(tiny_run, samples_by_step):
    evals = {r["step"]: r for r in _rows(tiny_run / "metrics.jsonl") if "eval_loss" in r}
    assert sorted(evals) == EVAL_STEPS
    for step in EVAL_STEPS:
        samples = samples_by_step[step]
        for s in samples:
            assert s["scores"] == metrics.score(s["output"], s["reference"], None)
        hits = sum(s["scores"]["exact_match"] for s in samples)
        assert evals[step]["eval_exact_match"] == hits / len(samples)
        for task in {s["task"] for s in samples}:
            chosen = [s for s in samples if s["task"] == task]
            rate = sum(s["scores"]["exact_match"] for s in chosen) / len(chosen)
            assert evals[step][f"eval_exact_match/task/{task}"] == rate


def test_in_memory_answers_equal_jaxsft_eval_of_the_saved_checkpoint(tiny_run, samples_by_step):
    _, reloaded = score(str(tiny_run))
    by_where = {s["where"]: s for s in reloaded}
    for s in samples_by_step[40]:
        assert s["output"] == by_where[s["where"]]["output"], s["where"]


def test_tensorboard_holds_every_logged_number(tiny_run):
    events = EventAccumulator(str(tiny_run / "tensorboard"))
    events.Reload()
    board = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    logged = [r for r in _rows(tiny_run / "metrics.jsonl")]
    assert {"loss", "mfu", "eval_loss", "eval_exact_match"} <= set(board)
    for record in logged:
        for key, value in record.items():
            if key != "step":
                assert board[key][record["step"]] == pytest.approx(value, rel=1e-6, abs=1e-30), (key, record["step"])


def test_the_run_directory_holds_the_plot(tiny_run):
    assert (tiny_run / "loss.png").read_bytes().startswith(b"\x89PNG")
