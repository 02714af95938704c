"""The training loop: build or restore, train, evaluate, log, save. Nothing else.

`train(cfg)` is the whole run. Re-running it on the same `train.run_dir` resumes from
the latest checkpoint (state and data position), so a stopped job is restarted by
running the same command again. How it stops on purpose (a second writer, non-finite
steps, SIGTERM, a damaged or unwritable checkpoint) and with which exit code: faults.py
and docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
from pathlib import Path

import jax
import numpy as np

from jaxsft import config_checks
from jaxsft.cache import cache_dir
from jaxsft.config import Config
from jaxsft.data import model_tokenizer
from jaxsft.data.pipeline import SFTData, build_data
from jaxsft.data.shards import rows_of_shards, shard_count, shards_for_rows
from jaxsft.eval.during_training import HeldOut, logged_scores
from jaxsft.model import peft, pretrained
from jaxsft.train import distributed, run_record, runlock, sharding
from jaxsft.train import program as program_lib
from jaxsft.train import state as state_lib
from jaxsft.train.checkpoint import Checkpointer
from jaxsft.train.faults import Preempted
from jaxsft.train.guard import SkipGuard
from jaxsft.train.logging_sinks import Sinks
from jaxsft.train.metrics import ProgressLine, Throughput, console, drop_after, format_status
from jaxsft.train.mfu import Utilization
from jaxsft.train.preempt import StopSignals


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
    # The held-out generation scores (eval_* keys of during_training.py) of the first and last eval.
    initial_scores: dict = dataclasses.field(default_factory=dict)
    final_scores: dict = dataclasses.field(default_factory=dict)


def _evaluate(eval_step, params, batches, frozen=()) -> float:
    loss_sum, weight = 0.0, 0.0
    for batch in batches:
        s, w = eval_step(params, batch, *frozen)
        loss_sum, weight = loss_sum + float(s), weight + float(w)
    return loss_sum / max(weight, 1.0)


def _eval_batches(data: SFTData, cfg: Config, batch_sharding) -> list:
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
        console.print(
            f"{shard_count(count, global_rows)} virtual data shards: each process builds {len(row_ids)} "
            f"rows of a batch to feed {len(fed_rows)}; set data.virtual_shards to a multiple of the "
            f"process count to avoid the extra work"
        )
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
    data.tokenizer.save(run_dir)  # tokenizer.model, or tokenizer/ for a Hugging Face tokenizer
    return run_dir


def train(cfg: Config, allow_config_change: bool = False) -> RunSummary:
    """The whole run, holding the run directory's lock (runlock.py) from before any data is read.
    A config that differs from the run directory's is refused unless `allow_config_change` (run_record.py)."""
    distributed.initialize()
    with runlock.RunLock(cfg.train.run_dir) if distributed.is_main() else contextlib.nullcontext():
        return _train(cfg, allow_config_change)


def _train(cfg: Config, allow_config_change: bool = False) -> RunSummary:
    wall_start = time.perf_counter()
    console.quiet = not distributed.is_main()
    mesh = sharding.make_mesh(cfg.mesh)
    program_lib.check_batch(cfg, mesh)
    config_checks.check_paths(cfg)  # init_from, tokenizer, data files: before any data is read
    cfg = model_tokenizer.with_model_tokenizer(cfg)  # init_from's own tokenizer unless data.tokenizer is set
    if model_tokenizer.fallback_note(cfg):
        console.print(model_tokenizer.fallback_note(cfg))
    # Presets and `init_from` fix the shapes here; the run directory records the result.
    cfg = dataclasses.replace(cfg, model=pretrained.resolve_config(cfg.model))
    peft.check(cfg.model)  # what this model's PEFT selection cannot train: one line, before any data
    config_changes = run_record.check(cfg, allow_config_change)  # a config other than the run's: refused
    data = build_data(cfg.data, seed=cfg.train.seed, cache_dir=cache_dir())
    for line in data.report.summary_lines():
        console.print(line)
    vocab_size = cfg.model.vocab_size or data.tokenizer.vocab_size
    model_tokenizer.check_belongs(data.tokenizer, vocab_size, cfg)
    console.print(model_tokenizer.describe(cfg, data.tokenizer))
    run_dir = _prepare_run_dir(cfg, data)

    program = program_lib.build(cfg, vocab_size, mesh)
    plan = program.plan
    _print_trainable(cfg, vocab_size)
    batch_sharding = program.batch_sharding
    train_iterator, to_global, fed = _train_feed(data, cfg, batch_sharding)
    data_iterator = train_iterator(cfg.train.seed)
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    # The newest checkpoint that verifies (checksums, finite values); damaged ones are set aside.
    start, train_state, data_restored = checkpointer.restore_latest(plan.abstract, data_iterator)
    if distributed.is_main():  # config.yaml, and config_history.jsonl when the config changed from `start` on
        run_record.record(cfg, config_changes, start, console.print)
    metrics_path = run_dir / cfg.logging.metrics_file
    if start >= cfg.train.steps:
        console.print(f"{run_dir} already finished at step {start}; raise train.steps to train further")
        data_iterator.close()
        checkpointer.close()
        return _summary(run_dir, metrics_path, start, start, [], 0.0, wall_start)
    if start:
        console.print(f"resuming from step {start} in {run_dir}")
        if not data_restored:
            console.print(
                f"the checkpoint holds no per-shard data state (written before data.virtual_shards): "
                f"the data stream restarts, reshuffled with seed {cfg.train.seed + start}"
            )
            data_iterator.close()
            data_iterator = train_iterator(cfg.train.seed + start)
    # PEFT: the frozen params ride along as an argument of every step, never in the state.
    text = cfg.model.peft.prompt_init_text  # prompt tuning: its virtual tokens start as this text
    prompt_ids = data.tokenizer.encode(text) if text else ()
    train_state, frozen = state_lib.initial_state(cfg, vocab_size, program.optimizer, plan, train_state, prompt_ids)
    # optim.drift_penalty: theta_0 rides along too (never checkpointed: a resumed run rebuilds it).
    anchor = state_lib.drift_anchor(cfg, vocab_size, plan, None if start else train_state["params"], prompt_ids)

    compile_start = time.perf_counter()
    train_step, eval_step = program.compile()
    compile_seconds = time.perf_counter() - compile_start
    console.print(
        f"compiled the train step in {compile_seconds:.1f}s on {mesh.devices.size} device(s), mesh {dict(mesh.shape)}"
    )

    eval_batches = _eval_batches(data, cfg, batch_sharding)
    if distributed.is_main():
        drop_after(metrics_path, start)  # steps after the checkpoint are logged again as they re-run
    writer = Sinks(cfg, run_dir, start, enabled=distributed.is_main())  # metrics.jsonl, TensorBoard, loss.png, W&B
    # The held-out loss, and the generation eval of eval.generate_n fixed prompts (samples.jsonl).
    held_out = HeldOut(
        cfg, data, vocab_size, frozen, run_dir, start, lambda params: _evaluate(eval_step, params, eval_batches, frozen)
    )
    if start == 0:
        writer.write(held_out(0, train_state["params"]))
    total = cfg.train.steps
    progress = ProgressLine(total, start, cfg.logging.progress)
    throughput, rates, utilization = Throughput(), [], Utilization(cfg, vocab_size, cache_dir())
    skips = SkipGuard(cfg.train.max_skipped_steps)
    try:
        with StopSignals(checkpointer.manager.reached_preemption) as signals:
            for step in range(start + 1, total + 1):
                local_batch = next(data_iterator)
                throughput.add(float(np.count_nonzero(local_batch["segment_ids"][fed])) * jax.process_count())
                train_state, metrics = train_step(train_state, to_global(local_batch), *frozen, *anchor)
                skips.observe(step, metrics["skipped"])  # a non-finite step changed nothing; K in a row stop
                if step % cfg.logging.log_every == 0 or step == total:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    skips.flush()
                    last["skipped_steps"] = skips.total
                    last["tokens_per_second"] = throughput.rate()
                    last["mfu"] = utilization(last["tokens_per_second"])
                    rates.append(last["tokens_per_second"])
                    writer.write({"step": step, **last})
                    progress.update(step, format_status(last))
                skips.check()
                if step % cfg.train.eval_every == 0 or step == total:
                    record = held_out(step, train_state["params"])
                    writer.write(record)
                    progress.held_out(record)
                    throughput.reset()  # evaluation time is not training throughput
                saved = checkpointer.save(step, train_state, data_iterator, force=step == total)
                checkpointer.check()  # a failed background write stops the run here, in one line
                _stop_if_signalled(signals, step, saved, checkpointer, train_state, data_iterator)
            skips.flush()
            skips.check()
    finally:
        progress.close()
        writer.close()
        checkpointer.close()
        data_iterator.close()  # stops Grain's prefetch thread (or worker processes)
    return _summary(run_dir, metrics_path, start, total, rates, compile_seconds, wall_start)


def _stop_if_signalled(
    signals: StopSignals, step: int, saved: bool, checkpointer: Checkpointer, train_state, data_iterator
) -> None:
    """SIGTERM / SIGINT arrived: save this step (the caller's `finally` waits for the write) and stop."""
    signum = signals.requested(step)
    if signum is None:
        return
    saved = saved or checkpointer.save(step, train_state, data_iterator, force=True)
    where = (
        f"saved checkpoint {step} in {checkpointer.directory}" if saved else "checkpoint.enabled=false: nothing saved"
    )
    raise Preempted(
        f"stopped by {signal.Signals(signum).name} after step {step}: {where}; run the same command to resume", signum
    )


def _summary(run_dir, metrics_path, start, final, rates, compile_seconds, wall_start) -> RunSummary:
    losses, evals = _logged(metrics_path, "loss"), _logged(metrics_path, "eval_loss")
    scores = logged_scores(metrics_path)
    return RunSummary(
        run_dir=str(run_dir),
        start_step=start,
        final_step=final,
        train_loss=losses[-1] if losses else None,
        initial_eval_loss=evals[0] if evals else None,
        final_eval_loss=evals[-1] if evals else None,
        # The first interval holds the first step's dispatch and warm-up; skip it when others exist.
        tokens_per_second=float(np.median(rates[1:] or rates)) if rates else 0.0,
        compile_seconds=compile_seconds,
        wall_seconds=time.perf_counter() - wall_start,
        initial_scores=scores[0] if scores else {},
        final_scores=scores[-1] if scores else {},
    )


def _print_trainable(cfg: Config, vocab_size: int) -> None:
    trainable, total = peft.count(cfg.model, vocab_size)
    console.print(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
