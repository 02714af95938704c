"""Two processes x 4 CPU devices over loopback train like one process on the same batches.

`launch/local.sh 2 --cpu-devices 4` runs `jaxsft train`; each process reads only its own
shard and the global batch is assembled from both. The test rebuilds those global
batches in this (8-device) process, runs the same steps on one process, and compares
losses and the jointly written checkpoint; then a 1-process run restores that checkpoint.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsft import config as config_lib
from jaxsft.cli import DEMO_CONFIG
from jaxsft.data.pipeline import build_data
from jaxsft.train import sharding, state as state_lib
from jaxsft.train.checkpoint import read_state
from jaxsft.train.optim import make_optimizer, schedule
from jaxsft.train.step import make_train_step
from jaxsft.train.trainer import train

from test_trainer import TINY

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches(cfg, cache):
    """The batches of a 2-process run: process 0's rows, then process 1's."""
    data = build_data(cfg.data, seed=cfg.train.seed, cache_dir=cache)
    rows = cfg.train.global_batch_size // 2
    iterators = [iter(data.train_dataset(rows, seed=cfg.train.seed, process_index=p, process_count=2))
                 for p in range(2)]
    batches = [[next(it) for _ in range(STEPS)] for it in iterators]
    for it in iterators:
        it.close()
    return data, [{k: np.concatenate([b0[k], b1[k]]) for k in b0} for b0, b1 in zip(*batches)]


def _one_process_run(cfg, data, batches):
    mesh = sharding.make_mesh(cfg.mesh)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    plan = state_lib.plan(cfg.model, data.tokenizer.vocab_size, optimizer, cfg.mesh.rules, mesh, cfg.train.seed)
    state = state_lib.create(cfg.model, data.tokenizer.vocab_size, optimizer, plan, cfg.train.seed)
    batch_sharding = sharding.batch_sharding(cfg.mesh.rules, mesh)
    step = jax.jit(make_train_step(plan.graphdef, optimizer, schedule(cfg.optim, cfg.train.steps)),
                   in_shardings=(plan.shardings, batch_sharding), out_shardings=(plan.shardings, None))
    losses = []
    for batch in batches:
        state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
        losses.append(float(metrics["loss"]))
    return losses, state


@pytest.mark.slow
def test_two_processes_train_like_one_and_restore_in_one(tmp_path):
    run = tmp_path / "run"
    cache = tmp_path / "cache"
    overrides = TINY + [f"train.run_dir={run}", f"train.steps={STEPS}", f"checkpoint.every={STEPS}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "JAXSFT_CACHE": str(cache), "LOG_DIR": str(tmp_path / "logs"), "PYTHONUNBUFFERED": "1"}
    command = [str(ROOT / "launch" / "local.sh"), "2", "--cpu-devices", "4", "--port", str(_free_port()), "--",
               sys.executable, "-m", "jaxsft.cli", "train", *[a for kv in overrides for a in ("--set", kv)]]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    two_process_losses = [r["loss"] for r in records if "loss" in r]
    cfg = config_lib.load(DEMO_CONFIG, overrides)  # what `jaxsft train` without a config file runs
    data, batches = _global_batches(cfg, cache)
    losses, state = _one_process_run(cfg, data, batches)
    np.testing.assert_allclose(two_process_losses, losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, np.asarray(b), rtol=1e-5, atol=1e-6),
                 read_state(run, STEPS)["params"], state["params"])

    os.environ["JAXSFT_CACHE"] = str(cache)
    summary = train(config_lib.load(DEMO_CONFIG, overrides[:-2] + [f"train.steps={STEPS + 1}"]))
    assert summary.start_step == STEPS and np.isfinite(summary.train_loss)
    assert read_state(run)["step"] == STEPS + 1
