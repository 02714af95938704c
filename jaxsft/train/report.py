"""The one-screen summary printed at the end of a run."""

from rich.table import Table

from jaxsft.train.metrics import console


def _fmt(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def print_summary(summary) -> None:
    table = Table(title="jaxsft run summary", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("run directory", summary.run_dir),
        ("steps", f"{summary.start_step} -> {summary.final_step}"),
        ("held-out loss", f"{_fmt(summary.initial_eval_loss)} (step 0) -> {_fmt(summary.final_eval_loss)}"),
        ("last train loss", _fmt(summary.train_loss)),
        ("throughput", f"{summary.tokens_per_second:,.0f} tokens/s (median over log intervals)"),
        ("compile", f"{summary.compile_seconds:.1f} s"),
        ("wall time", f"{summary.wall_seconds:.1f} s"),
        ("files", "config.yaml, tokenizer.model, metrics.jsonl, checkpoints/"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
