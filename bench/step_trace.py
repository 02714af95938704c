"""Where one compiled train step's time goes, op by op, and where each op sits in the program.

    python bench/step_trace.py [--size S] [--top 40]

Runs the step of a `bench/vs_hf.py` size (S, M, L: random rows, every token trained) under
`jax.profiler.trace`, sums each XLA op's time over the trace, and looks each op up in the
compiled HLO: its output shape, its custom-call target (the BLAS matmul, the fused attention)
and the computation it is in. `ENTRY` ops run once per step; ops in a loop body run once per
trip. An op of a loop's body found in `ENTRY` is work hoisted out of its loop, which runs even
when the loop does not (how round 14 found the loss's boundary blocks: bench/NOTES.md change 38).
The profiler slows the step (L: 40 -> 59 s) and XLA overlaps ops, so read the times as shares.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import tempfile
import time

from jaxsft import hostmem

if __name__ == "__main__":  # the malloc `jaxsft train` runs with (jaxsft/hostmem.py)
    hostmem.reexec_with_tunables()

import jax
import numpy as np
from common import random_batch, size_config  # bench/common.py

from jaxsft.train import program as program_lib
from jaxsft.train import sharding
from jaxsft.train import state as state_lib


def hlo_ops(text: str) -> dict[str, tuple[str, str, str]]:
    """op name -> (output shape, custom-call target or opcode, enclosing computation)."""
    ops, computation = {}, "?"
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = "ENTRY" if line.startswith("ENTRY") else line.split()[0].lstrip("%")
            continue
        m = re.match(r"\s+(?:ROOT )?%(\S+) = (\([^()]*\)|\S+) ([\w-]+)\(", line)  # a shape or a tuple of them
        if m:
            target = re.search(r'custom_call_target="([^"]+)"', line)
            shape = re.sub(r"\{[^}]*\}", "", m.group(2))  # without layouts
            ops[m.group(1)] = (shape, target.group(1) if target else m.group(3), computation)
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="S", choices=("S", "M", "L"))
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    cfg, vocab = size_config(args.size)
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
    program = program_lib.build(cfg, vocab, mesh)
    state, frozen = state_lib.initial_state(cfg, vocab, program.optimizer, program.plan)
    step = program.compile_train()
    ops = hlo_ops(step.as_text())
    rows, length = cfg.train.global_batch_size, cfg.data.max_length
    batch = sharding.global_batch(random_batch(np.random.default_rng(0), rows, length, vocab), program.batch_sharding)
    state, metrics = step(state, batch, *frozen)  # warm-up
    jax.block_until_ready(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            start = time.perf_counter()
            state, metrics = step(state, batch, *frozen)
            jax.block_until_ready(metrics)
            seconds = time.perf_counter() - start
        trace = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)[0]
        with gzip.open(trace) as f:
            events = json.load(f)["traceEvents"]
    total, count = collections.Counter(), collections.Counter()
    for e in events:  # loops and conditionals hold other ops: their time is their ops' time
        if e.get("ph") == "X" and e.get("name") in ops and ops[e["name"]][1] not in ("while", "conditional", "call"):
            total[e["name"]] += e["dur"] / 1e3
            count[e["name"]] += 1
    summed = sum(total.values())
    print(f"size {args.size}: one traced step {seconds:.2f} s; ops summed {summed / 1e3:.2f} s (they overlap)")
    print(f"{'ms':>9} {'share':>6} {'runs':>5}  {'op':<34} {'kind':<22} {'shape':<40} computation")
    for name, ms in total.most_common(args.top):
        shape, kind, where = ops[name]
        print(f"{ms:9.1f} {ms / summed:6.1%} {count[name]:5d}  {name:<34} {kind:<22} {shape[:40]:<40} {where}")
    by_kind = collections.Counter()
    for name, ms in total.items():
        by_kind[ops[name][1]] += ms
    print("by kind: " + ", ".join(f"{k} {v / summed:.1%}" for k, v in by_kind.most_common(8)))


if __name__ == "__main__":
    main()
