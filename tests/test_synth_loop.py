"""The synthetic-data loop (bench/synth_loop.py): its data split, its table, and a smoke run."""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("synth_loop", ROOT / "bench" / "synth_loop.py")
synth_loop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(synth_loop)


def test_pool_prompts_hide_their_answers_from_training(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), tasks="demo", seed_examples=5, pool=6, eval=4, seed=0)
    seed, pool, held_out = synth_loop.data(args)
    pool_records = [json.loads(line) for line in pool.read_text().splitlines()]
    assert len(pool_records) == 6 and all(r["messages"][-1]["role"] == "user" and r["reference"] for r in pool_records)
    held = {json.dumps(json.loads(line)["messages"][:-1]) for line in held_out.read_text().splitlines()}
    assert not held & {json.dumps(r["messages"]) for r in pool_records}  # held-out prompts stay out of the pool


def test_table_reads_both_rounds():
    rows = [
        {"name": "round 1", "train_records": 10, "exact_match": 0.25, "answers": 8, "loss": 1.5, "by_task": {"a": 0.5}},
        {"name": "round 2", "train_records": 14, "exact_match": 0.5, "answers": 8, "loss": 1.2, "by_task": {"b": 1.0}},
    ]
    totals = {"prompts": 4, "generated": 16, "kept": 4, "dropped": {"verify_failed": 10, "ranked_out": 2}}
    text = synth_loop.table(rows, totals)
    assert "| round 2 | 14 | 50.0% (of 8) | 1.200 | 0% | 100% |" in text
    assert "4 pool prompts x 4 samples = 16 answers, kept 4; dropped: verify_failed 10, ranked_out 2" in text


@pytest.mark.slow
def test_smoke_run_closes_the_loop_and_resumes(tmp_path):
    args = [sys.executable, str(ROOT / "bench" / "synth_loop.py"), "--out", str(tmp_path)]
    args += ["--seed-examples", "300", "--pool", "8", "--eval", "8", "--steps", "2", "--batch-size", "16"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[2].startswith("| round 1 (seed set) | 300 |") and lines[3].startswith("| round 2")
    assert "8 pool prompts x 4 samples = 32 answers" in lines[-1]
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 2
