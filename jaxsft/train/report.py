"""The one-screen summary printed at the end of a run."""

from pathlib import Path

from rich.table import Table

from jaxsft.train.metrics import console


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_summary(summary) -> None:
    table = Table(title="jaxsft run summary", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    trained = summary.final_step > summary.start_step
    rows = [
        ("run directory", summary.run_dir),
        (
            "steps",
            f"{summary.start_step} -> {summary.final_step}"
            if trained
            else f"{summary.final_step} (already finished: nothing trained now)",
        ),
        ("held-out loss", f"{_fmt(summary.initial_eval_loss)} (step 0) -> {_fmt(summary.final_eval_loss)}"),
        *_score_rows(summary.initial_scores, summary.final_scores),
        ("last train loss", _fmt(summary.train_loss)),
    ]
    if trained:
        rows += [
            ("throughput", f"{summary.tokens_per_second:,.0f} tokens/s (median over log intervals)"),
            ("compile", f"{summary.compile_seconds:.1f} s"),
        ]
    rows += [("wall time", f"{summary.wall_seconds:.1f} s"), ("files", ", ".join(_written(summary.run_dir)))]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


def _written(run_dir) -> list[str]:
    """What the run directory really holds (folders marked with a slash)."""
    entries = sorted(Path(run_dir).iterdir()) if Path(run_dir).is_dir() else []
    return [e.name + ("/" if e.is_dir() else "") for e in entries if not e.name.startswith(".")]


def _score_rows(first: dict, last: dict) -> list[tuple[str, str]]:
    """Held-out exact match, first eval -> last, and the last eval's exact match per task."""
    if "eval_exact_match" not in last:
        return []
    before = f"{first['eval_exact_match']:.1%} (step {first['step']}) -> " if first is not last and first else ""
    rows = [("held-out exact match", f"{before}{last['eval_exact_match']:.1%} (step {last['step']})")]
    tasks = {k.rsplit("/", 1)[1]: v for k, v in last.items() if k.startswith("eval_exact_match/task/")}
    if tasks:
        rows.append(("  by task", ", ".join(f"{task} {rate:.0%}" for task, rate in tasks.items())))
    return rows
