"""End to end: the trainer on the built-in data, exact resume, bad input, the CLI."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import DEMO_CONFIG, main
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

TINY = [
    # The architecture these tests were written for (the demo's is Qwen3-style with tied embeddings).
    "model.family=llama",
    "model.tie_embeddings=false",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
    "data.synthetic_train_examples=400",
    "data.synthetic_eval_examples=32",
    "data.tokenizer_vocab_size=512",
    "data.max_length=64",
    "train.global_batch_size=8",
    "train.eval_batches=1",
    "logging.progress=false",
    "logging.log_every=1",
    "optim.warmup_steps=2",
    # The generation eval during training has its own tests (tests/eval/test_during_training.py);
    # here it would only add a sampler compile to every run.
    "eval.generate_n=0",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(run_dir, *extra):
    return config_load.load(None, TINY + [f"train.run_dir={run_dir}", *extra])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """6 steps straight == 3 steps, stop, restore (state and data position), 3 more."""
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=6", "checkpoint.every=3", "train.eval_every=100"))
    straight = read_state(run, 6)
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    shutil.rmtree(run / "checkpoints" / "6")  # as if the run had stopped after step 3
    (run / "metrics.jsonl").unlink()
    summary = train(_cfg(run, "train.steps=6", "checkpoint.every=3", "train.eval_every=100"))
    assert summary.start_step == 3
    resumed = read_state(run, 6)
    assert [r["loss"] for r in _records(run) if "loss" in r] == losses[3:]
    jax.tree.map(np.testing.assert_array_equal, straight, resumed)


def test_bad_lines_are_reported_and_good_lines_train(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}
    lines = [json.dumps(good)] * 30 + [
        "{not json",
        json.dumps({"conversation": []}),
        json.dumps({"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]}),
        json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
    ]
    data.write_text("\n".join(lines) + "\n")
    summary = train(
        _cfg(
            tmp_path / "run",
            f"data.train_files=[{data}]",
            f"data.eval_files=[{data}]",
            "train.steps=2",
            "data.max_dropped_fraction=0.5",
        )
    )
    assert summary.final_step == 2 and np.isfinite(summary.train_loss)
    err = capsys.readouterr().err
    for line_no in (31, 32, 33, 34):
        assert f"{data}:{line_no}:" in err


def test_too_many_bad_lines_fail_with_one_line(tmp_path, capsys):
    data = tmp_path / "chats.jsonl"
    data.write_text(
        "{bad\n" * 5
        + json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
        + "\n"
    )
    code = main(["train", "--set", f"data.train_files=[{data}]", "--set", f"train.run_dir={tmp_path / 'run'}"])
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("jaxsft: error:") and "max_dropped_fraction" in last
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_trains_and_writes_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    args = (
        ["train"]
        + [a for kv in TINY for a in ("--set", kv)]
        + ["--set", f"train.run_dir={run}", "--set", "train.steps=4", "--set", "train.eval_every=2"]
    )
    assert main(args) == 0
    assert config_load.load(run / "config.yaml") == config_load.load(
        DEMO_CONFIG, TINY + [f"train.run_dir={run}", "train.steps=4", "train.eval_every=2"]
    )
    records = _records(run)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "trained_tokens"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert (run / "tokenizer.model").is_file() and read_state(run)["step"] == 4
    capsys.readouterr()
    assert main(args) == 0  # the same command again: nothing left to do, and it says so
    err = capsys.readouterr().err
    assert "already finished at step 4" in err and f"{evals[-1]['eval_loss']:.4f}" in err
