"""Tokens per second through the data pipeline: `build_data`, then packed train batches.

    python bench/data_throughput.py [--examples 20000] [--rows 16] [--length 256] [--batches 200]

Two sources (the synthetic tasks, and the same records written as JSONL to a temp dir),
each with worker_count 0, 1 and 2. One line per case:
  build s          `build_data` (read, count, encode pass); the tokenizer is trained once
                   beforehand and cached, so this excludes SentencePiece training
  first s          iterator start (worker processes spawn here) and the first batch
  ms/batch         steady state, batches 2..N
  tokens/s         non-pad tokens per second in steady state
  e2e tokens/s     non-pad tokens / (build + first + steady): the whole pipeline
  packing          non-pad tokens / all tokens of the batches
Compare ms/batch with the train step (bench/train_step.py; ~550 ms for the demo on CPU).
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

from jaxsft.config import DataConfig
from jaxsft.data import synthetic
from jaxsft.data.pipeline import build_data


def _write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _run(name: str, cfg: DataConfig, cache: Path, rows: int, batches: int) -> None:
    start = time.perf_counter()
    data = build_data(cfg, seed=0, cache_dir=cache)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    it = iter(data.train_dataset(rows, seed=0))
    first = next(it)
    first_s = time.perf_counter() - start
    real, total = int((first["segment_ids"] > 0).sum()), first["segment_ids"].size
    start = time.perf_counter()
    steady_real = 0
    for _ in range(batches - 1):
        batch = next(it)
        steady_real += int((batch["segment_ids"] > 0).sum())
        total += batch["segment_ids"].size
    steady_s = time.perf_counter() - start
    it.close()
    real += steady_real
    print(f"{name:<10} workers={cfg.worker_count}  build {build_s:5.2f} s  first {first_s:5.2f} s  "
          f"{1e3 * steady_s / (batches - 1):6.2f} ms/batch  {steady_real / steady_s:11,.0f} tokens/s  "
          f"e2e {real / (build_s + first_s + steady_s):9,.0f} tokens/s  packing {real / total:.3f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=20000)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train = _write_jsonl(tmp / "train.jsonl", synthetic.generate(args.examples, 0, "train"))
        evals = _write_jsonl(tmp / "eval.jsonl", synthetic.generate(512, 0, "eval"))
        sources = {
            "synthetic": DataConfig(synthetic_train_examples=args.examples, max_length=args.length),
            "jsonl": DataConfig(train_files=(train,), eval_files=(evals,), max_length=args.length),
        }
        print(f"{args.examples} records, {args.rows}x{args.length} rows/batch, {args.batches} batches per case")
        for name, cfg in sources.items():
            build_data(cfg, seed=0, cache_dir=tmp)  # trains and caches the tokenizer, untimed
            for workers in args.workers:
                _run(name, dataclasses.replace(cfg, worker_count=workers), tmp, args.rows, args.batches)


if __name__ == "__main__":  # mp_prefetch spawns workers that re-import this file
    main()
