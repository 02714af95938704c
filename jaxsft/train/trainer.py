"""The training loop: build or restore, train, evaluate, log, save. Nothing else.

`train(cfg)` is the whole run. Re-running it on the same `train.run_dir` resumes from
the latest checkpoint (state and data position), so a stopped job is restarted by
running the same command again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from jaxsft import config as config_lib
from jaxsft.config import Config, ConfigError
from jaxsft.data.pipeline import SFTData, build_data
from jaxsft.data.shards import rows_of_shards, shard_count, shards_for_rows
from jaxsft.model import lora, peft, pretrained
from jaxsft.train import distributed, sharding, state as state_lib
from jaxsft.train.checkpoint import Checkpointer
from jaxsft.train.metrics import MetricsWriter, ProgressLine, Throughput, console, format_status
from jaxsft.train.optim import make_optimizer, schedule
from jaxsft.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class RunSummary:
    run_dir: str
    start_step: int
    final_step: int
    train_loss: float | None
    initial_eval_loss: float | None
    final_eval_loss: float | None
    tokens_per_second: float
    compile_seconds: float
    wall_seconds: float


def cache_dir() -> Path:
    return Path(os.environ.get("JAXSFT_CACHE", Path.home() / ".cache" / "jaxsft"))


def _check_batch(cfg: Config, mesh) -> int:
    """Rows each process feeds per step; fails with a config message when they cannot split."""
    t = cfg.train
    shards = sharding.batch_axes_size(cfg.mesh.rules, mesh)
    if t.global_batch_size % (shards * t.micro_batches):
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must divide by the batch shards ({shards}) "
                          f"x train.micro_batches ({t.micro_batches})")
    return t.global_batch_size // jax.process_count()


def _evaluate(eval_step, params, batches, frozen=()) -> float:
    loss_sum, weight = 0.0, 0.0
    for batch in batches:
        s, w = eval_step(params, batch, *frozen)
        loss_sum, weight = loss_sum + float(s), weight + float(w)
    return loss_sum / max(weight, 1.0)


def _eval_batches(data: SFTData, cfg: Config, rows: int, batch_sharding) -> list:
    """Every process builds the whole eval batches and places the rows of its devices."""
    global_rows = cfg.train.global_batch_size
    batches = data.eval_batches(global_rows, cfg.train.eval_batches)
    every_row = np.arange(global_rows)
    return [sharding.global_batch_of_rows(b, batch_sharding, every_row, global_rows) for b in batches]


def _train_feed(data: SFTData, cfg: Config, batch_sharding):
    """This process's train stream: (seed -> iterator over the virtual shards that hold its
    devices' rows, all of them with one process; their batch -> global arrays; which of
    their rows it feeds). The global batches are the same under any process count."""
    global_rows, count = cfg.train.global_batch_size, cfg.data.virtual_shards
    fed_rows = sharding.process_rows(batch_sharding, global_rows)
    shards = shards_for_rows(fed_rows, global_rows, count)
    row_ids = rows_of_shards(shards, global_rows, count)
    if len(row_ids) > len(fed_rows):
        console.print(f"{shard_count(count, global_rows)} virtual data shards: each process builds {len(row_ids)} "
                      f"rows of a batch to feed {len(fed_rows)}; set data.virtual_shards to a multiple of the "
                      f"process count to avoid the extra work")
    stream = lambda seed: iter(data.train_dataset(global_rows, seed=seed, shards=shards))  # noqa: E731
    to_global = lambda b: sharding.global_batch_of_rows(b, batch_sharding, row_ids, global_rows)  # noqa: E731
    return stream, to_global, np.isin(row_ids, fed_rows)


def _logged(metrics_path: Path, key: str) -> list[float]:
    """Every value of `key` in the run's metrics file, this and earlier invocations."""
    if not metrics_path.exists():
        return []
    records = (json.loads(line) for line in metrics_path.read_text().splitlines())
    return [r[key] for r in records if key in r]


def _prepare_run_dir(cfg: Config, data: SFTData) -> Path:
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not distributed.is_main():
        return run_dir
    config_lib.save(cfg, run_dir / "config.yaml")
    data.tokenizer.save(run_dir)  # tokenizer.model, or tokenizer/ for a Hugging Face tokenizer
    return run_dir


def train(cfg: Config) -> RunSummary:
    wall_start = time.perf_counter()
    distributed.initialize()
    console.quiet = not distributed.is_main()
    mesh = sharding.make_mesh(cfg.mesh)
    rows = _check_batch(cfg, mesh)
    data = build_data(cfg.data, seed=cfg.train.seed, cache_dir=cache_dir())
    for line in data.report.summary_lines():
        console.print(line)
    # Presets and `init_from` fix the shapes here; the run directory records the result.
    cfg = dataclasses.replace(cfg, model=pretrained.resolve_config(cfg.model))
    vocab_size = cfg.model.vocab_size or data.tokenizer.vocab_size
    if vocab_size < data.tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {data.tokenizer.vocab_size}")
    run_dir = _prepare_run_dir(cfg, data)

    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    plan = state_lib.plan(cfg.model, vocab_size, optimizer, cfg.mesh.rules, mesh, cfg.train.seed)
    _print_trainable(cfg, vocab_size)
    batch_sharding = sharding.batch_sharding(cfg.mesh.rules, mesh)
    train_iterator, to_global, fed = _train_feed(data, cfg, batch_sharding)
    data_iterator = train_iterator(cfg.train.seed)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    start = checkpointer.latest_step() or 0
    metrics_path = run_dir / cfg.logging.metrics_file
    if start >= cfg.train.steps:
        console.print(f"{run_dir} already finished at step {start}; raise train.steps to train further")
        data_iterator.close()
        checkpointer.close()
        return _summary(run_dir, metrics_path, start, start, [], 0.0, wall_start)
    if start:
        console.print(f"resuming from step {start} in {run_dir}")
        train_state, data_restored = checkpointer.restore(start, plan.abstract, data_iterator)
        if not data_restored:
            console.print(f"the checkpoint holds no per-shard data state (written before data.virtual_shards): "
                          f"the data stream restarts, reshuffled with seed {cfg.train.seed + start}")
            data_iterator.close()
            data_iterator = train_iterator(cfg.train.seed + start)
    else:
        train_state = None
    # PEFT: the frozen params ride along as an argument of every step, never in the state.
    train_state, frozen = _initial_state(cfg, vocab_size, optimizer, plan, train_state)

    micro_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sharding.spec))
    step_fn = make_train_step(plan.graphdef, optimizer, schedule(cfg.optim, cfg.train.steps),
                              cfg.train.micro_batches,
                              lambda x: jax.lax.with_sharding_constraint(x, micro_sharding), cfg.model.peft,
                              cfg.train.seed, cfg.train.loss_chunk)
    rules = sharding.flax_rules(cfg.mesh.rules)
    compile_start = time.perf_counter()
    eval_fn = make_eval_step(plan.graphdef, cfg.model.peft, cfg.train.loss_chunk)
    train_step, eval_step = _compile(step_fn, eval_fn, plan, batch_sharding, rows, cfg, mesh, rules)
    compile_seconds = time.perf_counter() - compile_start
    console.print(f"compiled the train step in {compile_seconds:.1f}s on {mesh.devices.size} device(s), "
                  f"mesh {dict(mesh.shape)}")

    eval_batches = _eval_batches(data, cfg, rows, batch_sharding)
    writer = MetricsWriter(metrics_path, enabled=distributed.is_main())
    if start == 0:
        writer.write({"step": 0, "eval_loss": _evaluate(eval_step, train_state["params"], eval_batches, frozen)})
    total = cfg.train.steps
    progress = ProgressLine(total, start, cfg.logging.progress)
    throughput, rates = Throughput(), []
    try:
        for step in range(start + 1, total + 1):
            local_batch = next(data_iterator)
            throughput.add(float(np.count_nonzero(local_batch["segment_ids"][fed])) * jax.process_count())
            train_state, metrics = train_step(train_state, to_global(local_batch), *frozen)
            if step % cfg.logging.log_every == 0 or step == total:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last["tokens_per_second"] = throughput.rate()
                rates.append(last["tokens_per_second"])
                writer.write({"step": step, **last})
                progress.update(step, format_status(last))
            if step % cfg.train.eval_every == 0 or step == total:
                writer.write({"step": step, "eval_loss": _evaluate(eval_step, train_state["params"], eval_batches, frozen)})
                throughput.reset()  # evaluation time is not training throughput
            checkpointer.save(step, train_state, data_iterator, force=step == total)
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
        data_iterator.close()  # stops Grain's prefetch thread (or worker processes)
    return _summary(run_dir, metrics_path, start, total, rates, compile_seconds, wall_start)


def _initial_state(cfg: Config, vocab_size: int, optimizer, plan, restored=None):
    """(train state, frozen-params argument tuple): the restored state or a fresh one (Hugging Face /
    Orbax weights, a PEFT adapter, or a seeded init); PEFT's frozen part is built from the base."""
    if not plan.peft:
        if restored is not None:
            return restored, ()
        if cfg.model.init_from:
            params = pretrained.load_pretrained(cfg.model, vocab_size, plan.shardings["params"])
            return state_lib.from_params(params, optimizer, plan), ()
        return state_lib.create(cfg.model, vocab_size, optimizer, plan, cfg.train.seed), ()
    if cfg.model.init_from:
        base = pretrained.load_pretrained(cfg.model, vocab_size, plan.full_shardings)
    else:
        base = state_lib.create_base(cfg.model, vocab_size, plan, cfg.train.seed)
    if restored is not None:
        return restored, (state_lib.frozen_part(cfg.model, base, plan),)
    if cfg.model.peft.init_from:
        frozen = state_lib.frozen_part(cfg.model, base, plan)
        return state_lib.from_params(_peft_adapters(cfg, plan), optimizer, plan), (frozen,)
    trainable, frozen = state_lib.split_base(cfg.model, base, plan, cfg.train.seed)
    return state_lib.from_params(trainable, optimizer, plan), (frozen,)


def _summary(run_dir, metrics_path, start, final, rates, compile_seconds, wall_start) -> RunSummary:
    losses, evals = _logged(metrics_path, "loss"), _logged(metrics_path, "eval_loss")
    return RunSummary(
        run_dir=str(run_dir), start_step=start, final_step=final,
        train_loss=losses[-1] if losses else None,
        initial_eval_loss=evals[0] if evals else None, final_eval_loss=evals[-1] if evals else None,
        # The first interval holds the first step's dispatch and warm-up; skip it when others exist.
        tokens_per_second=float(np.median(rates[1:] or rates)) if rates else 0.0,
        compile_seconds=compile_seconds, wall_seconds=time.perf_counter() - wall_start)


def _print_trainable(cfg: Config, vocab_size: int) -> None:
    trainable, total = peft.count(cfg.model, vocab_size)
    console.print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: "
                  f"{100 * trainable / total:.4f}")


def _peft_adapters(cfg: Config, plan):
    """The adapters of `model.peft.init_from` (a HF PEFT directory), placed on the adapters' shardings."""
    pe = cfg.model.peft
    peft_cfg, adapters = lora.load_peft(pe.init_from, plan.frozen_abstract)
    if (peft_cfg.method, peft_cfg.rank, set(lora.target_paths(peft_cfg))) != (
            pe.method, pe.rank, set(lora.target_paths(pe))):
        raise ConfigError(f"model.peft.init_from={pe.init_from}: {peft_cfg.method} rank {peft_cfg.rank} on "
                          f"{list(peft_cfg.targets)}; set model.peft.method, rank and targets to match")
    return jax.device_put(adapters, plan.shardings["params"])


def _compile(step_fn, eval_fn, plan, batch_sharding, rows, cfg: Config, mesh, rules):
    """Compiles both steps ahead of time against abstract inputs with their shardings."""
    from flax import linen

    global_rows, length = rows * jax.process_count(), cfg.data.max_length
    with jax.set_mesh(mesh), linen.logical_axis_rules(rules):
        return (state_lib.compile_step(step_fn, plan, batch_sharding, global_rows, length),
                state_lib.compile_step(eval_fn, plan, batch_sharding, global_rows, length, train=False))
