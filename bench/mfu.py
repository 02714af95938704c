"""Steady-state step time, tokens/s and MFU of the train step `jaxsft train` would run for a config.

    python bench/mfu.py [CONFIG] [--set KEY=VALUE ...] [--steps 10] [--rounds 3] [--segments 1]
                        [--label NAME] [--peak table|measured]

The program comes from program.build and the initial state from state.initial_state (the
seed's random init: `model.init_from` is ignored, so no weights are read), on every local
device. Batches are random tokens in `--segments` packed segments per row. Model FLOPs are
those of `jaxsft compile` (aot.model_flops: 6N per token plus attention, 4N with PEFT).
The peak is the chip's dense bf16 figure from aot.CHIPS / aot.GPUS (the trainer's table,
jaxsft/train/mfu.py) on a listed TPU or GPU, else (a CPU, an H200, `--peak measured`) a
measured matmul in the model's compute dtype of the step's MLP shape. Prints one table row; `--header` prints the header first.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from jaxsft import hostmem

if __name__ == "__main__":  # run as a script (not imported by a test): the malloc `jaxsft train` runs with
    hostmem.reexec_with_tunables()  # jaxsft/hostmem.py

import jax
import jax.numpy as jnp
import numpy as np
from common import jax_matmul_flops

from jaxsft import config_load
from jaxsft.model import pretrained
from jaxsft.model.transformer import param_count
from jaxsft.train import aot, mfu, sharding
from jaxsft.train import program as program_lib
from jaxsft.train import state as state_lib

HEADER = (
    f"{'run':<28} {'params':>8} {'tokens/step':>11} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
    f"{'peak TF/s':>9} {'MFU':>6}  peak from"
)


def packed_batch(rng: np.random.Generator, rows: int, length: int, vocab: int, segments: int) -> dict:
    """Random tokens in `segments` equal segments per row (positions restart in each), all trained."""
    tokens = rng.integers(1, vocab, (rows, length + 1)).astype(np.int32)
    segment_ids = np.minimum(np.arange(length) * segments // length + 1, segments).astype(np.int32)
    starts = np.searchsorted(segment_ids, segment_ids)  # first index of each token's segment
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_weights": np.ones((rows, length), np.float32),
        "segment_ids": np.tile(segment_ids, (rows, 1)),
        "positions": np.tile((np.arange(length) - starts).astype(np.int32), (rows, 1)),
    }


def steady_step_seconds(step, state, batch, frozen, steps: int, rounds: int):
    """Median over `rounds` of the mean step time over `steps` steps (one sync per round)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch, *frozen)
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times), state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--segments", type=int, default=1, help="packed segments per row")
    parser.add_argument("--label", default="")
    parser.add_argument("--peak", choices=["table", "measured"], default="table")
    parser.add_argument("--header", action="store_true")
    args = parser.parse_args()

    cfg = config_load.load(args.config, args.overrides)
    model = dataclasses.replace(pretrained.resolve_config(dataclasses.replace(cfg.model, init_from="")), init_from="")
    cfg = dataclasses.replace(cfg, model=model)
    vocab = cfg.model.vocab_size or program_lib.vocab_size_without_data(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    program_lib.check_batch(cfg, mesh)
    program = program_lib.build(cfg, vocab, mesh)
    state, frozen = state_lib.initial_state(cfg, vocab, program.optimizer, program.plan)
    start = time.perf_counter()
    step = program.compile_train()
    compile_s = time.perf_counter() - start
    rows, length = cfg.train.global_batch_size, cfg.data.max_length
    batch_np = packed_batch(np.random.default_rng(0), rows, length, vocab, args.segments)
    batch = sharding.global_batch(batch_np, program.batch_sharding)
    state, metrics = step(state, batch, *frozen)  # warm-up
    jax.block_until_ready(metrics)
    seconds, state = steady_step_seconds(step, state, batch, frozen, args.steps, args.rounds)

    devices = jax.device_count()
    table = mfu._table_peak(jax.devices()[0]) if args.peak == "table" else None  # the trainer's own table
    peak = (table, "chip table, dense bf16") if table else None
    if peak is None:
        dtype = jnp.dtype(cfg.model.dtype)
        peak = (
            jax_matmul_flops(rows * length // devices, cfg.model.d_model, cfg.model.d_ff, dtype),
            f"measured {dtype.name} matmul",
        )
    model_flops = aot.model_flops(cfg, vocab)[0]
    achieved = model_flops / seconds
    if args.header:
        print(HEADER)
    print(
        f"{(args.label or args.config or 'defaults')[:28]:<28} {param_count(cfg.model, vocab) / 1e6:7.0f}M "
        f"{rows * length:>11,} {seconds * 1e3:9.1f} {rows * length / seconds:10,.0f} {achieved / 1e12:8.3f} "
        f"{peak[0] / 1e12:9.3f} {achieved / (peak[0] * devices):6.1%}  {peak[1]}; {devices} "
        f"{jax.devices()[0].device_kind} device(s); compile {compile_s:.0f} s",
        flush=True,
    )


if __name__ == "__main__":
    main()
