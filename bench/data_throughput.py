"""Tokens per second through the data pipeline: `build_data`, then packed train batches.

    python bench/data_throughput.py [--examples 20000] [--rows 16] [--length 256] [--batches 200]

Cases: the synthetic tasks; the same records as JSONL; a two-source mixture (that JSONL
plus a "chat mix" file of realistic lengths: lognormal, median ~150 tokens, long tail),
each with worker_count 0, 1 and 2; then packing efficiency on the chat mix alone at
1024 and 2048 tokens per row for every packing mode. One line per case:
  build s          `build_data` (read, count, encode pass); the tokenizer is trained once
                   beforehand and cached, so this excludes SentencePiece training
  first s          iterator start (worker processes spawn here) and the first batch
  ms/batch         steady state, batches 2..N
  tokens/s         non-pad tokens per second in steady state
  e2e tokens/s     non-pad tokens / (build + first + steady): the whole pipeline
  packing          non-pad tokens / all tokens of the batches
  x train          steady tokens/s over what the demo train step consumes (TRAIN_TOKENS_PER_S)
Compare ms/batch with the train step (bench/train_step.py; ~550 ms for the demo on CPU).
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxsft.config import DataConfig, SourceConfig
from jaxsft.data import synthetic
from jaxsft.data.inspect import measure_packing
from jaxsft.data.pipeline import build_data

TRAIN_TOKENS_PER_S = 7300  # the demo model's train step on this machine class (README)


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
    print(
        f"{name:<10} workers={cfg.worker_count}  build {build_s:5.2f} s  first {first_s:5.2f} s  "
        f"{1e3 * steady_s / (batches - 1):6.2f} ms/batch  {steady_real / steady_s:11,.0f} tokens/s  "
        f"e2e {real / (build_s + first_s + steady_s):9,.0f} tokens/s  packing {real / total:.3f}  "
        f"x train {steady_real / steady_s / TRAIN_TOKENS_PER_S:5.0f}",
        flush=True,
    )


def chat_mix(n: int, seed: int = 0) -> list[dict]:
    """Conversations with lognormal prompt and answer lengths (median ~33 and ~90 words)."""
    rng = np.random.default_rng(seed)
    words = np.array(synthetic.WORDS)
    out = []
    for _ in range(n):
        q, a = (" ".join(rng.choice(words, max(1, int(rng.lognormal(mu, 0.9))))) for mu in (3.5, 4.5))
        out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def packing_efficiency(path: str, cache: Path, rows: int) -> None:
    for length in (1024, 2048):
        for packing in ("best_fit", "first_fit", "concat", "none"):
            cfg = DataConfig(max_length=length, packing=packing, sources=(SourceConfig(path=path),))
            data = build_data(cfg, seed=0, cache_dir=cache)
            mean = float(np.concatenate(data.lengths).mean())
            efficiency, per_row = measure_packing(data, rows, batches=80)
            print(
                f"chat mix  length {length}  {packing:<9}  packing {efficiency:.4f}  {per_row:5.2f} examples/row  "
                f"(mean example {mean:.0f} tokens)",
                flush=True,
            )


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
        mix = _write_jsonl(tmp / "chat_mix.jsonl", chat_mix(4000))
        sources = {
            "synthetic": DataConfig(synthetic_train_examples=args.examples, max_length=args.length),
            "jsonl": DataConfig(train_files=(train,), eval_files=(evals,), max_length=args.length),
            "mixture": DataConfig(
                max_length=args.length,
                sources=(SourceConfig(path=train, eval_path=evals, weight=3.0), SourceConfig(path=mix, weight=1.0)),
            ),
        }
        print(f"{args.examples} records, {args.rows}x{args.length} rows/batch, {args.batches} batches per case")
        for name, cfg in sources.items():
            build_data(cfg, seed=0, cache_dir=tmp)  # trains and caches the tokenizer, untimed
            for workers in args.workers:
                _run(name, dataclasses.replace(cfg, worker_count=workers), tmp, args.rows, args.batches)
        packing_efficiency(mix, tmp, args.rows)


if __name__ == "__main__":  # mp_prefetch spawns workers that re-import this file
    main()
