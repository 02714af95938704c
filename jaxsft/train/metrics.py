"""Run metrics: a JSONL file, a console progress bar, and throughput.

Device values are fetched only at log steps (one host sync per `log_every` steps), so
logging never serialises the training loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Data text (file names, user content) is printed as it is: no rich markup or emoji codes.
console = Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)


class MetricsWriter:
    """Appends one JSON object per line; a resumed run continues the same file."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.file = open(path, "a", encoding="utf-8") if enabled else None  # only one process writes

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class Throughput:
    """Tokens per second between two log points (compilation excluded by the caller)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.tokens = 0.0

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def reset(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0.0

    def rate(self) -> float:
        """Tokens per second since the last call (or reset)."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        self.reset()
        return rate


class ProgressLine:
    """A rich progress bar (loss, tokens/s, ETA), or plain lines when disabled or not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool, label: str = "train", unit: str = "step"):
        self.bar, self.unit = None, unit
        if enabled and console.is_terminal:
            self.bar = Progress(
                TextColumn(label, style="bold"),
                BarColumn(bar_width=20),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=console,
            )
            self.task = self.bar.add_task(label, total=total, completed=start, status="")
            self.bar.start()
        self.status, self.held = "", ""

    def update(self, step: int, status: str) -> None:
        self.status = status
        if self.bar is not None:
            self.bar.update(self.task, completed=step, status=self._status())
        else:
            console.print(f"{self.unit} {step}: {status}")

    def held_out(self, record: dict) -> None:
        """An eval record: its loss and exact match stay on the bar, or get a plain line of their own."""
        self.held = format_held_out(record)
        if self.bar is not None:
            self.bar.update(self.task, status=self._status())
        else:
            console.print(f"step {record['step']}: {self.held}")

    def _status(self) -> str:
        return f"{self.status}  | {self.held}" if self.held else self.status

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def format_status(record: dict) -> str:
    mfu = f"  MFU {record['mfu']:.1%}" if record.get("mfu") is not None else ""
    drift = f"  drift {record['drift']:.3g}" if "drift" in record else ""
    return (
        f"loss {record['loss']:.4f}{drift}  lr {record['learning_rate']:.2e}  "
        f"gnorm {record['grad_norm']:.3f}  {record['tokens_per_second']:,.0f} tok/s{mfu}"
    )


def format_held_out(record: dict) -> str:
    exact = f"  exact match {record['eval_exact_match']:.1%}" if "eval_exact_match" in record else ""
    return f"held-out loss {record['eval_loss']:.4f}{exact}"


def drop_after(path: Path, step: int) -> None:
    """Forgets the records of steps after `step` (0: all of them): a resumed run writes those
    steps again, and a crashed run may have logged steps its checkpoint never reached."""
    if not path.exists():
        return

    def logged_step(line: str) -> float:
        try:
            return json.loads(line).get("step", 0)
        except (ValueError, AttributeError):  # a line cut short by a crash
            return float("inf")

    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if step and logged_step(line) <= step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
