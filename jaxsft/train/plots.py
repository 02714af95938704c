"""`loss.png`: train and held-out loss, and the held-out exact match, against step.

Contract:
    plot_run(metrics_path, out_path) -> True when written (False: nothing logged yet)

Drawn from metrics.jsonl, so a resumed run's plot holds every invocation's steps. Uses
matplotlib's object API on the Agg canvas (no pyplot, no display, no global backend
state), and replaces the file atomically so a viewer never reads half an image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _rows(metrics_path: Path) -> list[dict]:
    rows = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def plot_run(metrics_path: Path, out_path: Path) -> bool:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows(metrics_path) if Path(metrics_path).exists() else []
    train, held = _series(rows, "loss"), _series(rows, "eval_loss")
    exact = _series(rows, "eval_exact_match")
    if not train[0] and not held[0]:
        return False
    figure = Figure(figsize=(7, 4), dpi=100, layout="tight")
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(*train, label="train loss", color="tab:blue", linewidth=1)
    ax.plot(*held, label="held-out loss", color="tab:orange", marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if exact[0]:
        right = ax.twinx()
        right.plot(
            exact[0],
            [100 * v for v in exact[1]],
            label="held-out exact match",
            color="tab:green",
            marker="s",
            markersize=3,
        )
        right.set_ylabel("exact match (%)")
        right.set_ylim(0, 100)
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    tmp = Path(out_path).with_suffix(f".{os.getpid()}.tmp.png")
    figure.savefig(tmp)
    tmp.replace(out_path)
    return True
