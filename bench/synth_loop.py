"""The synthetic-data loop (rejection-sampling fine-tuning), measured: docs/quality.md section 3.

    python bench/synth_loop.py                                  # the measured size, runs/synth_loop
    python bench/synth_loop.py --out /tmp/sl --seed-examples 300 --pool 16 --eval 16 --steps 4   # smoke
    python bench/synth_loop.py --doc docs/quality.md            # also put the table in the doc

1. Data: a labelled seed set, a pool of prompts whose answers only the verifier sees, and
   held-out prompts (the built-in tasks: `--tasks demo` or `quality`; held out by prompt).
2. Round 1: `jaxsft train` on the seed set (configs/demo.yaml's model and optimizer).
3. `jaxsft synth ROUND1 --prompts pool --samples K --filter verify --filter dedup
   --filter rank:keep=1`: K answers per pool prompt, the verifier keeps the correct ones,
   the most likely distinct correct answer per prompt is written.
4. Round 2: the same training (same init, steps and tokenizer) on seed set + kept answers.
5. `jaxsft eval` of both rounds on the held-out prompts: exact match overall and by task.

Resumable: every stage whose output exists is skipped (a run with eval/report.json is done;
an interrupted synth or train resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from jaxsft.data import synthetic, synthetic_tasks

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- synth-loop:begin -->", "<!-- synth-loop:end -->"


def _jaxsft(*args: str) -> None:
    print("$ jaxsft " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "jaxsft.cli", *args], check=True)


def _records(tasks: str, n: int, seed: int, split: str) -> list[dict]:
    make = synthetic.generate if tasks == "demo" else synthetic_tasks.generate
    return make(n, seed, split)


def _write(path: Path, records: list[dict]) -> Path:
    if not path.is_file():
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def data(args) -> tuple[Path, Path, Path]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed = _write(out / "seed.jsonl", _records(args.tasks, args.seed_examples, args.seed, "train"))
    # Pool prompts come from another stream of the train split: unlabelled for training (the
    # final answer is dropped from the messages), their reference kept for the verifier.
    pool_records = [
        {"messages": r["messages"][:-1], "reference": r["messages"][-1]["content"], "task": r["task"]}
        for r in _records(args.tasks, args.pool, args.seed + 1, "train")
    ]
    pool = _write(out / "pool.jsonl", pool_records)
    held_out = _write(out / "heldout.jsonl", _records(args.tasks, args.eval, args.seed, "eval"))
    return seed, pool, held_out


def train_and_eval(name: str, args, train_file: Path, held_out: Path, extra: list[str] = ()) -> Path:
    run = Path(args.out) / name
    if (run / "eval" / "report.json").is_file():
        print(f"{name}: done, skipped", flush=True)
        return run
    sets = [
        f"train.run_dir={run}",
        f"train.steps={args.steps}",
        f"train.eval_every={args.steps}",
        f"checkpoint.every={args.steps}",
        f"data.train_files=[{train_file}]",
        f"data.eval_files=[{held_out}]",
        f"train.seed={args.seed}",
        "eval.generate_n=0",
        *extra,
    ]
    _jaxsft("train", str(ROOT / "configs" / "demo.yaml"), *[a for s in sets for a in ("--set", s)])
    _jaxsft("eval", str(run), "--data", str(held_out), "--set", f"eval.max_new_tokens={args.max_new_tokens}")
    return run


def synth(args, run: Path, pool: Path) -> Path:
    out = Path(args.out) / "synth.jsonl"
    _jaxsft(
        "synth", str(run), "--prompts", str(pool), "--out", str(out), "--samples", str(args.samples),
        "--batch-size", str(args.batch_size), "--temperature", str(args.temperature), "--top-p", "1.0",
        "--max-new-tokens", str(args.max_new_tokens), "--seed", str(args.seed),
        "--filter", "verify", "--filter", "dedup", "--filter", "rank:keep=1",
    )  # fmt: skip
    return out


def expanded(args, seed: Path, synthesized: Path) -> Path:
    path = Path(args.out) / "expanded.jsonl"
    if not path.is_file():
        path.write_text(seed.read_text() + synthesized.read_text())
    return path


def row(name: str, run: Path, train_file: Path) -> dict:
    report = json.loads((run / "eval" / "report.json").read_text())
    generation = report["generation"]
    by_task = {t: v["exact_match"]["rate"] for t, v in generation["by_task"].items()}
    return {
        "name": name,
        "train_records": sum(1 for line in train_file.read_text().splitlines() if line.strip()),
        "exact_match": generation["overall"]["exact_match"]["rate"],
        "answers": generation["overall"]["answers"],
        "loss": report["loss"]["overall"]["loss"],
        "by_task": by_task,
    }


def table(rows: list[dict], synth_totals: dict) -> str:
    tasks = sorted({t for r in rows for t in r["by_task"]})
    lines = [
        "| round | train records | held-out exact match | held-out loss | " + " | ".join(tasks) + " |",
        "|---|---|---|---|" + "---|" * len(tasks),
    ]
    for r in rows:
        per_task = " | ".join(f"{100 * r['by_task'].get(t, 0):.0f}%" for t in tasks)
        lines.append(
            f"| {r['name']} | {r['train_records']} | {100 * r['exact_match']:.1f}% (of {r['answers']}) | "
            f"{r['loss']:.3f} | {per_task} |"
        )
    dropped = ", ".join(f"{k} {v}" for k, v in synth_totals["dropped"].items()) or "none"
    lines.append("")
    lines.append(
        f"synth: {synth_totals['prompts']} pool prompts x {synth_totals['generated'] // max(synth_totals['prompts'], 1)}"
        f" samples = {synth_totals['generated']} answers, kept {synth_totals['kept']}; dropped: {dropped}"
    )
    return "\n".join(lines)


def synth_totals(path: Path) -> dict:
    ledger = [json.loads(line) for line in path.with_name(path.name + ".progress.jsonl").read_text().splitlines()]
    entries = ledger[1:]
    dropped: dict[str, int] = {}
    for e in entries:
        for k, v in e["dropped"].items():
            dropped[k] = dropped.get(k, 0) + v
    return {
        "prompts": len(entries),
        "generated": sum(e["generated"] for e in entries),
        "kept": sum(e["kept"] for e in entries),
        "dropped": dict(sorted(dropped.items())),
    }


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers to put the table between")
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/synth_loop")
    p.add_argument("--tasks", choices=["demo", "quality"], default="demo")
    p.add_argument("--seed-examples", type=int, default=2000, help="labelled records of round 1")
    p.add_argument("--pool", type=int, default=2000, help="unlabelled prompts answered by round 1")
    p.add_argument("--eval", type=int, default=256, help="held-out prompts both rounds are scored on")
    p.add_argument("--steps", type=int, default=300, help="train steps of each round")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per pool prompt")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=64, help="synth sampler rows per call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default="", help="write the table into this markdown file, between markers")
    args = p.parse_args(argv)
    seed, pool, held_out = data(args)
    first = train_and_eval("round1", args, seed, held_out)
    synthesized = synth(args, first, pool)
    train2 = expanded(args, seed, synthesized)
    # The same start and tokenizer as round 1: only the training data differs.
    second = train_and_eval("round2", args, train2, held_out, [f"data.tokenizer={first / 'tokenizer.model'}"])
    text = table([row("round 1 (seed set)", first, seed), row("round 2 (+ verified synth)", second, train2)],
                 synth_totals(synthesized))  # fmt: skip
    print(text)
    (Path(args.out) / "table.md").write_text(text + "\n")
    if args.doc:
        write_doc(Path(args.doc), text)


if __name__ == "__main__":
    main()
