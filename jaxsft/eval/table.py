"""The console view of an eval report: one row per group (all, each source, each task, each split)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, markup=False, emoji=False)
if not console.is_terminal:
    console.width = 120  # a log file or a pipe: keep one row per line rather than wrap at 80

GENERATION_COLUMNS = (
    ("exact", "exact_match"),
    ("norm", "normalized_match"),
    ("contains", "contains"),
    ("json", "json_valid"),
    ("regex", "regex_match"),
)


def _num(x, spec=".4f") -> str:
    return "-" if x is None else format(x, spec)


def _rate(metric: dict | None, answers: int) -> str:
    """A percentage; hits/of where the metric applies to only some answers (json, regex)."""
    if not metric or metric["rate"] is None:
        return "-"
    return f"{100 * metric['rate']:.1f}%" + ("" if metric["of"] == answers else f" {metric['hits']}/{metric['of']}")


def _groups(report: dict) -> list[tuple[str, dict, dict | None]]:
    """(label, loss dict, generation dict or None) for all, each source, each task, each split."""
    loss, gen = report["loss"], report["generation"] or {}
    rows = [("all", loss["overall"], gen.get("overall"))]
    for kind in ("source", "task", "split"):
        names = list(dict.fromkeys([*loss.get(f"by_{kind}", {}), *gen.get(f"by_{kind}", {})]))
        if kind == "source" and len(names) < 2:
            continue  # one source: its row repeats "all"
        rows += [
            (f"{kind}: {n}", loss.get(f"by_{kind}", {}).get(n, {}), gen.get(f"by_{kind}", {}).get(n)) for n in names
        ]
    return rows


def report_table(report: dict) -> Table:
    step = f" @ step {report['step']}" if report.get("step") is not None else ""
    table = Table(title=f"jaxsft eval: {report['source']}{step}", title_justify="left")
    for name in ("group", "records", "loss", "ppl", "tok acc", "answers", *(c for c, _ in GENERATION_COLUMNS)):
        table.add_column(name, justify="left" if name == "group" else "right")
    for label, loss, gen in _groups(report):
        table.add_row(
            label,
            str(loss.get("examples", "-")),
            _num(loss.get("loss")),
            _num(loss.get("perplexity"), ".2f"),
            _rate_plain(loss.get("token_accuracy")),
            str(gen["answers"]) if gen else "-",
            *(_rate(gen and gen[key], gen and gen["answers"]) for _, key in GENERATION_COLUMNS),
        )
    return table


def _rate_plain(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(report: dict) -> None:
    console.print(report_table(report))
    for note in report["notes"]:
        console.print(f"note: {note}")


def print_comparison(report: dict, other: dict) -> None:
    """Both tables, then the headline numbers side by side (first -> second)."""
    print_report(report)
    print_report(other)
    table = Table(title=f"{report['source']} -> {other['source']}", title_justify="left")
    for name in ("group", "loss", "token acc", "exact", "normalized"):
        table.add_column(name, justify="left" if name == "group" else "right")
    theirs = {label: (loss, gen) for label, loss, gen in _groups(other)}
    for label, loss, gen in _groups(report):
        loss_b, gen_b = theirs.get(label, ({}, None))
        exact = [_rate_plain(g and g["exact_match"]["rate"]) for g in (gen, gen_b)]
        normalized = [_rate_plain(g and g["normalized_match"]["rate"]) for g in (gen, gen_b)]
        table.add_row(
            label,
            f"{_num(loss.get('loss'))} -> {_num(loss_b.get('loss'))}",
            f"{_rate_plain(loss.get('token_accuracy'))} -> {_rate_plain(loss_b.get('token_accuracy'))}",
            " -> ".join(exact),
            " -> ".join(normalized),
        )
    console.print(table)
