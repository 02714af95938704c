"""The instruction-tuning quality suite (docs/quality.md): pretrain a tiny base, fine-tune it
with each recipe in configs/quality/, score every run, and write the table.

    python bench/quality.py                      # all recipes, runs under runs/quality
    python bench/quality.py --out /tmp/q --steps 4 --examples 64 --eval-examples 40   # a smoke run
    python bench/quality.py --doc docs/quality.md   # also replace the table in the doc

Resumable: a run with an eval report is done and skipped; an interrupted one resumes from its
last checkpoint (the trainer's own resume). Each score comes from `jaxsft eval` on the run's
held-out data: exact match of the instruction answers by split (seen phrasing, unseen
phrasing, unseen task; a `<think>` block the model writes is removed first), and the
language-model loss on the held-out `text` corpus, whose rise over the base is forgetting.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from jaxsft.data import synthetic_tasks
from jaxsft.eval import metrics

RECIPES = (
    "sft-full",
    "sft-lora",
    "sft-prompt",
    "sft-adapter",
    "sft-replay",
    "sft-drift",
    "sft-no-reasoning",
    "sft-2-phrasings",
)
CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "quality"
THINK = re.compile(r"^\s*<think>.*?</think>\s*", re.S)
BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def _jaxsft(*args: str) -> None:
    print("$ jaxsft " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "jaxsft.cli", *args], check=True)


def _recipe(name: str, args) -> Path:
    """The recipe's YAML, resized for a smoke run when asked, written beside the runs."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    config["train"]["run_dir"] = str(Path(args.out) / name)
    if args.steps:
        config["train"].update(steps=args.steps, eval_every=args.steps)
        config["checkpoint"] = {"every": args.steps}
    for source in config["data"]["sources"]:
        source.update({k: v for k, v in (("examples", args.examples), ("eval_examples", args.eval_examples)) if v})
    path = Path(args.out) / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run(name: str, args, extra: list[str] = ()) -> None:
    """Trains (or resumes) and evaluates one recipe, unless its eval report exists."""
    run_dir = Path(args.out) / name
    if (run_dir / "eval" / "report.json").is_file():
        print(f"{name}: done, skipped", flush=True)
        return
    started = time.time()
    _jaxsft("train", str(_recipe(name, args)), *extra)
    _jaxsft("eval", str(run_dir))  # the run's own config.yaml: its held-out records
    (run_dir / "eval" / "seconds.txt").write_text(f"{time.time() - started:.0f}\n")


def _eval_records(config: dict, seed: int) -> list[dict]:
    sft = next(s for s in config["data"]["sources"] if s.get("path") == "quality")
    return synthetic_tasks.generate(sft.get("eval_examples", 512), seed, "eval")


def row(name: str, args) -> dict:
    """Exact match by split and the held-out text loss of one finished run."""
    run_dir = Path(args.out) / name
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    records = _eval_records(config, config.get("train", {}).get("seed", 0))
    hits: dict[str, list[bool]] = {s: [] for s in synthetic_tasks.EVAL_SPLITS}
    for line in (run_dir / "eval" / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        if sample["source"] != "sft" or sample.get("output") is None:
            continue
        record = records[int(sample["where"].rsplit(":", 1)[1]) - 1]
        answer = THINK.sub("", sample["output"])
        hits[record["split"]].append(bool(metrics.score(answer, sample["reference"])["exact_match"]))
    rates = {s: sum(h) / len(h) if h else float("nan") for s, h in hits.items()}
    text_loss = report["loss"]["by_source"]["text"]["loss"]
    seconds = run_dir / "eval" / "seconds.txt"
    return {
        "name": name,
        **rates,
        "text_loss": text_loss,
        "seconds": int(seconds.read_text()) if seconds.is_file() else None,
    }


def table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["name"] == "base")["text_loss"]
    lines = [
        "| run | seen phrasing | unseen phrasing | unseen task | text loss | forgetting | train+eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pct = [f"{100 * r[s]:.1f}%" for s in synthetic_tasks.EVAL_SPLITS]
        lines.append(
            f"| {r['name']} | {' | '.join(pct)} | {r['text_loss']:.3f} | {r['text_loss'] - base:+.3f} | "
            f"{r['seconds'] if r['seconds'] is not None else '-'} |"
        )
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers to put the table between")
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    path.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    p.add_argument("--steps", type=int, default=0, help="override every recipe's train.steps (smoke runs)")
    p.add_argument("--examples", type=int, default=0, help="override the train records per source")
    p.add_argument("--eval-examples", type=int, default=0, help="override the eval records per source")
    p.add_argument("--doc", default="", help="write the table into this markdown file, between markers")
    args = p.parse_args(argv)
    names = ["base", *args.recipes]
    run("base", args)
    export = Path(args.out) / "base-hf"
    if not (export / "config.json").is_file():
        _jaxsft("export", str(Path(args.out) / "base"), str(export), "--format", "hf")
    for k, name in enumerate(args.recipes, 1):
        print(f"[{k}/{len(args.recipes)}] {name}", flush=True)
        run(name, args, ["--set", f"model.init_from=hf:{export.resolve()}"])
    text = table([row(n, args) for n in names])
    print(text)
    (Path(args.out) / "table.md").write_text(text + "\n")
    if args.doc:
        write_doc(Path(args.doc), text)


if __name__ == "__main__":
    main()
