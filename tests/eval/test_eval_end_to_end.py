"""`jaxsft eval` on a tiny trained run: its numbers agree with the trainer, the samples,
an independent forward pass, a re-run, a checkpoint step and the run's Hugging Face export."""

import json

import numpy as np
import pytest
from flax import nnx

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.data import synthetic
from jaxsft.data.formats import parse_record
from jaxsft.data.pipeline import Encoder
from jaxsft.eval import metrics
from jaxsft.eval.evaluate import score
from jaxsft.infer import runs

pytestmark = pytest.mark.slow
EVAL_RECORDS = 24  # data.synthetic_eval_examples of the tiny run


def _logged_eval_loss(run, step: int) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval_loss"] for r in rows if r["step"] == step and "eval_loss" in r)


@pytest.fixture(scope="module")
def first(tiny_run):
    return score(str(tiny_run))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_loss_equals_the_eval_loss_the_trainer_logged(tiny_run, first):
    report, _ = first
    assert report["step"] == 40 and report["sources"] == ["synthetic"]
    assert report["loss"]["overall"]["examples"] == EVAL_RECORDS
    assert report["loss"]["overall"]["loss"] == pytest.approx(_logged_eval_loss(tiny_run, 40), abs=1e-5)
    tasks = report["loss"]["by_task"]
    assert set(tasks) <= {t.__name__ for t in synthetic.TASKS} and len(tasks) >= 5
    assert sum(t["examples"] for t in tasks.values()) == EVAL_RECORDS
    assert sum(t["tokens"] for t in tasks.values()) == report["loss"]["overall"]["tokens"]


def test_report_counts_are_the_samples_recounted(first):
    report, samples = first
    assert len(samples) == report["records"]["with_reference"] == EVAL_RECORDS
    assert any(s["output"] for s in samples)  # the tiny model answers something
    for s in samples:
        assert s["scores"] == metrics.score(s["output"], s["reference"], None)
        assert s["prompt"][-1]["role"] == "user"  # the prompt stops before the answer
    overall = report["generation"]["overall"]
    for metric in metrics.METRICS:
        hits = sum(bool(s["scores"][metric]) for s in samples)
        applicable = sum(s["scores"][metric] is not None for s in samples)
        assert (overall[metric]["hits"], overall[metric]["of"]) == (hits, applicable), metric
        by_task = report["generation"]["by_task"].values()
        assert sum(t[metric]["hits"] for t in by_task) == hits
    assert overall["json_valid"]["of"] == sum(
        s["task"] == "convert_format" and s["reference"][0] in "[{" for s in samples
    )


def test_cli_report_files_rerun_and_a_checkpoint_step(tiny_run, first, tmp_path):
    out = tmp_path / "report.json"
    assert main(["eval", str(tiny_run), "--out", str(out), "--compare", str(tiny_run / "checkpoints" / "20")]) == 0
    report = json.loads(out.read_text())
    compare = report.pop("compare")
    assert report == json.loads(json.dumps(first[0]))  # a re-run: the same report, number for number
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == json.loads(json.dumps(first[1]))
    assert compare["step"] == 20 and len((tmp_path / "samples.compare.jsonl").read_text().splitlines()) == EVAL_RECORDS
    assert compare["loss"]["overall"]["loss"] == pytest.approx(_logged_eval_loss(tiny_run, 20), abs=1e-5)
    assert main(["eval", str(tiny_run / "checkpoints" / "30")]) == 2  # no such step: one line, status 2


def test_prompt_never_holds_the_reference_and_long_prompts_are_skipped(tiny_run, first, tmp_path):
    _, base = first
    rows = []
    for k, record in enumerate(synthetic.generate(6, 0, "eval")):
        record = {**record, "task": f"r{k}"}
        if k % 2 == 0:  # the reference becomes what the model answered: the answer must not move
            record["reference"] = base[k]["output"]
        rows.append(record)
    rows.append({"messages": [{"role": "user", "content": "plum " * 200}, {"role": "assistant", "content": "x"}]})
    report, samples = score(str(tiny_run), data_files=[_write(tmp_path / "swap.jsonl", rows)])
    assert [s["output"] for s in samples[:6]] == [s["output"] for s in base[:6]]
    for k in range(6):
        expected = True if k % 2 == 0 else base[k]["scores"]["exact_match"]
        assert samples[k]["scores"]["exact_match"] == expected
    assert report["generation"]["overall"]["answers"] == 6 and report["records"]["prompt_too_long"] == 1
    assert samples[6]["skipped"] == "prompt_too_long" and samples[6]["output"] is None
    assert report["loss"]["overall"]["examples"] == 6  # the long record keeps no trained token within max_length
    assert report["records"]["loss_dropped"] == {"no_trained_tokens": 1}
    _check_per_record_loss(tiny_run, rows[:6], report["loss"]["by_task"])


def _check_per_record_loss(run, rows, by_task):
    """Loss and token accuracy of each record from one unpacked forward pass in numpy."""
    model = runs.load(run)
    cfg = config_load.load(run / "config.yaml")
    encoder = Encoder(cfg.data, model.tokenizer)
    forward = nnx.merge(model.graphdef, model.params)
    for k, row in enumerate(rows):
        features, _ = encoder.encode(parse_record(row, "messages", {}))
        tokens = features["inputs"][None]
        logits = np.asarray(forward(tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens)), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        log_probs = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        w, t = features["loss_weights"], features["targets"]
        nll = -log_probs[np.arange(len(t)), t]
        got = by_task[f"r{k}"]
        assert got["loss"] == pytest.approx((w * nll).sum() / w.sum(), abs=1e-5)
        assert got["token_accuracy"] == pytest.approx((w * (logits.argmax(-1) == t)).sum() / w.sum())


def test_the_hf_export_scores_the_same(tiny_run, first, tmp_path):
    runs.export_hf(tiny_run, tmp_path / "hf")
    report, samples = score(f"hf:{tmp_path / 'hf'}", str(tiny_run / "config.yaml"))
    assert [s["output"] for s in samples] == [s["output"] for s in first[1]]
    assert report["generation"] == first[0]["generation"]
    assert report["loss"]["overall"]["loss"] == pytest.approx(first[0]["loss"]["overall"]["loss"], abs=1e-5)


def test_records_without_references_give_loss_and_say_why_not_more(tiny_run, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": f"And {k} + 1?"},
            ]
        }
        for k in range(3)
    ]
    report, samples = score(str(tiny_run), data_files=[_write(tmp_path / "noref.jsonl", rows)])
    assert report["generation"] is None and samples == []
    assert report["loss"]["overall"]["examples"] == 3 and report["loss"]["overall"]["loss"] > 0
    assert any("generation metrics need references" in note for note in report["notes"])
