"""Tokens per second of the compiled train step on this machine, for a config's model.

    python bench/train_step.py [CONFIG] [--set KEY=VALUE ...] [--steps 20]

Random packed rows (no data pipeline), so the number is the step alone; compare with
bench/data_throughput.py for the pipeline side. `--trained F` gives the rows SFT's loss mask:
alternating prompt and answer spans with a share F of tokens trained (default 1: every
token, as in pretraining).
"""

import argparse
import dataclasses
import time

from jaxsft import hostmem

if __name__ == "__main__":  # run as a script (not imported by a test): the malloc `jaxsft train` runs with
    hostmem.reexec_with_tunables()  # jaxsft/hostmem.py

import jax
import numpy as np
from common import random_batch  # bench/common.py

from jaxsft import config_load
from jaxsft.cli import DEMO_CONFIG
from jaxsft.model import pretrained
from jaxsft.model.transformer import param_count
from jaxsft.train import program as program_lib
from jaxsft.train import sharding
from jaxsft.train import state as state_lib


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default=str(DEMO_CONFIG))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--trained", type=float, default=1.0, help="share of tokens with loss weight (SFT: ~0.5)")
    args = parser.parse_args()
    cfg = config_load.load(args.config, args.overrides)
    cfg = dataclasses.replace(cfg, model=pretrained.resolve_config(cfg.model))  # presets
    vocab = cfg.model.vocab_size or args.vocab
    mesh = sharding.make_mesh(cfg.mesh)
    program = program_lib.build(cfg, vocab, mesh)
    train_state, frozen = state_lib.initial_state(cfg, vocab, program.optimizer, program.plan)
    start = time.perf_counter()
    step = program.compile_train()  # what `jaxsft train` runs
    compile_s = time.perf_counter() - start
    rows, length = cfg.train.global_batch_size, cfg.data.max_length
    host_batch = random_batch(np.random.default_rng(0), rows, length, vocab, args.trained)
    batch = sharding.global_batch(host_batch, program.batch_sharding)
    train_state, metrics = step(train_state, batch, *frozen)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_state, metrics = step(train_state, batch, *frozen)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / args.steps
    n_params = param_count(cfg.model, vocab)
    print(
        f"model {n_params:,} params, {rows}x{length} tokens/step on {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), {host_batch['loss_weights'].mean():.0%} of tokens trained"
    )
    print(
        f"compile {compile_s:.1f} s; {seconds * 1e3:.1f} ms/step; "
        f"{rows * length / seconds:,.0f} tokens/s; ~{6 * n_params * rows * length / seconds / 1e9:.1f} GFLOP/s (6N)"
    )


if __name__ == "__main__":
    main()
