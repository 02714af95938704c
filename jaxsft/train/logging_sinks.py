"""Where the trainer's metric records go: metrics.jsonl, TensorBoard, loss.png, Weights & Biases.

Contract:
    sinks = Sinks(cfg, run_dir, start, enabled)   (enabled: this process logs; one does)
    sinks.write({"step": ..., key: number, ...})       every sink gets the same record
    sinks.close()                                      flushes, and draws loss.png once more

metrics.jsonl is the record of truth (the summary, the plot and resume read it). The
TensorBoard event files in `RUN/tensorboard/` get every number of every record under its
metrics.jsonl key as the tag, at its step; they are written by tensorboardX (protobuf only,
no TensorFlow). A resumed run purges the events after its checkpoint, as metrics.jsonl
drops those lines. `loss.png` is redrawn at each record with a held-out loss and at close
(plots.py). Weights & Biases is used when `logging.wandb` names a project and `wandb` is
installed (it is not a dependency); a resumed run continues the same W&B run.
"""

from __future__ import annotations

import math
import time
import uuid
from pathlib import Path

from jaxsft import config_load
from jaxsft.config import Config
from jaxsft.train.metrics import MetricsWriter, console
from jaxsft.train.plots import plot_run

TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "loss.png"


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers, `step` aside."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class _TensorBoard:
    def __init__(self, run_dir: Path, start: int):
        from tensorboardX import SummaryWriter

        # purge_step: events at or after it, left by an earlier invocation, are hidden.
        # tensorboardX names the file by the whole second only: two invocations in one
        # second would share (and truncate) one file. The nanosecond suffix keeps each
        # invocation's file apart and in the order the reader must replay them.
        self.writer = SummaryWriter(
            str(run_dir / TENSORBOARD_DIR),
            purge_step=start + 1 if start else None,
            filename_suffix=f".{time.time_ns():020d}",
        )

    def write(self, record: dict) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: Config, run_dir: Path):
        import wandb

        id_file = run_dir / ".wandb_id"  # the same W&B run across resumes of this directory
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.logging.wandb,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config_load.to_dict(cfg),
        )

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


class Sinks:
    def __init__(self, cfg: Config, run_dir: Path, start: int, enabled: bool = True):
        run_dir = Path(run_dir)
        self.metrics = MetricsWriter(run_dir / cfg.logging.metrics_file, enabled=enabled)
        self.plot_path = run_dir / PLOT_FILE if enabled and cfg.logging.plot else None
        self.others = []
        if enabled and cfg.logging.tensorboard:
            self.others.append(_TensorBoard(run_dir, start))
        if enabled and cfg.logging.wandb:
            if _wandb_installed():
                self.others.append(_WandB(cfg, run_dir))
            else:
                console.print(
                    f"logging.wandb={cfg.logging.wandb}: wandb is not installed (pip install wandb); "
                    f"logging to metrics.jsonl and TensorBoard only"
                )

    def write(self, record: dict) -> None:
        self.metrics.write(record)
        for sink in self.others:
            sink.write(record)
        if "eval_loss" in record:
            self.plot()

    def plot(self) -> None:
        if self.plot_path is not None:
            plot_run(self.metrics.path, self.plot_path)

    def close(self) -> None:
        self.metrics.close()
        self.plot()
        for sink in self.others:
            sink.close()
