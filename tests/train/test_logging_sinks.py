"""Where metric records go: TensorBoard (read back with tensorboard's reader), loss.png,
Weights & Biases when installed, the console lines, MFU and the end summary."""

import json
import sys
import types

import jax
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxsft import config_load
from jaxsft.eval.during_training import flat_scores
from jaxsft.train import mfu
from jaxsft.train.logging_sinks import PLOT_FILE, TENSORBOARD_DIR, Sinks
from jaxsft.train.metrics import ProgressLine, format_status
from jaxsft.train.plots import plot_run
from jaxsft.train.report import print_summary
from jaxsft.train.trainer import RunSummary

RECORDS = [
    {"step": 0, "eval_loss": 6.25, "eval_exact_match": 0.0, "eval_exact_match/task/count": 0.0},
    {"step": 1, "loss": 6.2, "learning_rate": 1e-3, "tokens_per_second": 1234.5, "mfu": 0.012, "skipped": 0.0},
    {"step": 2, "loss": 5.1, "learning_rate": 2e-3, "tokens_per_second": 2345.25, "mfu": 0.023, "skipped": 0.0},
    {"step": 2, "eval_loss": 4.9, "eval_exact_match": 0.25, "eval_exact_match/task/count": 0.5},
]


def _cfg(run_dir, *extra):
    return config_load.load(None, [f"train.run_dir={run_dir}", *extra])


def _tensorboard(run_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _jsonl_series(run_dir) -> dict[str, list[tuple[int, float]]]:
    series = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], value))
    return series


def _write(sinks, records):
    for record in records:
        sinks.write(record)
    sinks.close()


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    _write(Sinks(_cfg(tmp_path), tmp_path, start=0), RECORDS)
    board, logged = _tensorboard(tmp_path), _jsonl_series(tmp_path)
    assert set(board) == set(logged)
    for tag, points in logged.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in points], tag
        assert [v for _, v in board[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32


def test_a_resumed_run_hides_the_events_after_its_checkpoint(tmp_path):
    _write(Sinks(_cfg(tmp_path), tmp_path, start=0), RECORDS)
    _write(Sinks(_cfg(tmp_path), tmp_path, start=1), [{"step": 2, "loss": 3.0}])  # step 2 re-run
    assert _tensorboard(tmp_path)["loss"] == [(1, pytest.approx(6.2)), (2, 3.0)]


def test_loss_png_is_drawn_at_each_eval_and_at_close(tmp_path):
    sinks = Sinks(_cfg(tmp_path), tmp_path, start=0)
    sinks.write(RECORDS[1])
    assert not (tmp_path / PLOT_FILE).exists()  # no held-out loss yet
    sinks.write(RECORDS[0])
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    (tmp_path / PLOT_FILE).unlink()
    sinks.close()
    assert (tmp_path / PLOT_FILE).read_bytes().startswith(b"\x89PNG")
    assert not list(tmp_path.glob("*.tmp*"))


def test_plot_needs_a_loss(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "tokens_per_second": 5.0}\n{"step": 2, "lo')
    assert plot_run(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is False


def test_logging_switches_and_other_processes_write_nothing(tmp_path):
    (tmp_path / "a").mkdir()
    _write(Sinks(_cfg(tmp_path / "a", "logging.tensorboard=false", "logging.plot=false"), tmp_path / "a", 0), RECORDS)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.jsonl"]
    (tmp_path / "b").mkdir()
    _write(Sinks(_cfg(tmp_path / "b"), tmp_path / "b", 0, enabled=False), RECORDS)
    assert list((tmp_path / "b").iterdir()) == []


def test_weights_and_biases_gets_the_same_scalars(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake = types.ModuleType("wandb")
    fake.init, fake.__spec__ = init, types.SimpleNamespace(name="wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("jaxsft.train.logging_sinks._wandb_installed", lambda: True)
    _write(Sinks(_cfg(tmp_path, "logging.wandb=my-project"), tmp_path, 0), RECORDS)
    (kind, kwargs), *logs, last = calls
    assert kind == "init" and kwargs["project"] == "my-project" and kwargs["config"]["logging"]["wandb"] == "my-project"
    assert last == ("finish",)
    assert [(step, values) for _, step, values in logs] == [
        (r["step"], {k: v for k, v in r.items() if k != "step"}) for r in RECORDS
    ]
    calls.clear()
    _write(Sinks(_cfg(tmp_path, "logging.wandb=my-project"), tmp_path, 2), [])
    assert calls[0][1]["id"] == kwargs["id"]  # a resume continues the same W&B run


def test_wandb_set_but_not_installed_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("jaxsft.train.logging_sinks._wandb_installed", lambda: False)
    _write(Sinks(_cfg(tmp_path, "logging.wandb=proj"), tmp_path, 0), RECORDS[:1])
    assert "wandb is not installed" in capsys.readouterr().err


def test_plain_lines_show_mfu_and_the_held_out_scores(capsys):
    progress = ProgressLine(total=4, start=0, enabled=False)
    progress.update(
        2,
        format_status(
            {"loss": 5.1, "learning_rate": 2e-3, "grad_norm": 1.0, "tokens_per_second": 2345.0, "mfu": 0.023}
        ),
    )
    progress.held_out(RECORDS[3])
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 2: loss 5.1000") and lines[0].endswith("2,345 tok/s  MFU 2.3%")
    assert lines[1] == "step 2: held-out loss 4.9000  exact match 25.0%"


def test_flat_scores_name_every_group_once():
    tally = lambda rate: {
        m: {"rate": rate if m == "exact_match" else None}
        for m in ("exact_match", "normalized_match", "contains", "json_valid", "regex_match")
    }
    report = {
        "overall": tally(0.5),
        "by_source": {"a": tally(1.0), "b b": tally(0.0)},
        "by_task": {"sort": tally(0.25)},
    }
    assert flat_scores(report) == {
        "eval_exact_match": 0.5,
        "eval_exact_match/source/a": 1.0,
        "eval_exact_match/source/b_b": 0.0,
        "eval_exact_match/task/sort": 0.25,
    }
    report["by_source"] = {"a": tally(0.5)}  # one source: its scores are the overall ones
    assert "eval_exact_match/source/a" not in flat_scores(report)


def test_summary_prints_generation_scores_next_to_the_losses(tmp_path, capsys):
    first, last = {"step": 0, **RECORDS[0]}, {"step": 2, **RECORDS[3]}
    print_summary(RunSummary(str(tmp_path), 0, 2, 5.1, 6.25, 4.9, 2000.0, 1.0, 2.0, first, last))
    out = capsys.readouterr().err
    assert "held-out exact match  0.0% (step 0) -> 25.0% (step 2)" in out
    assert "count 50%" in out


class _Device:
    def __init__(self, platform, device_kind):
        self.platform, self.device_kind = platform, device_kind


def test_peak_flops_come_from_the_named_tables():
    assert mfu.peak_flops(_Device("tpu", "TPU v5 lite"), "bfloat16", None)[0] == 197e12
    assert mfu.peak_flops(_Device("gpu", "NVIDIA H100 80GB HBM3"), "bfloat16", None)[0] == 989e12


def test_a_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    measured = []
    monkeypatch.setattr(mfu, "measured_matmul_flops", lambda dtype, device: measured.append(dtype) or 5e10)
    cpu = _Device("cpu", "cpu")
    assert mfu.peak_flops(cpu, "float32", tmp_path) == (5e10, "measured float32 matmul")
    assert mfu.peak_flops(cpu, "float32", tmp_path)[0] == 5e10 and measured == ["float32"]
    assert json.loads((tmp_path / "peak_flops.json").read_text())


def test_mfu_is_model_flops_over_the_peak(monkeypatch, tmp_path):
    monkeypatch.setattr(mfu, "measured_matmul_flops", lambda dtype, device: 1e9)
    cfg = config_load.load(
        None,
        [
            "model.d_model=32",
            "model.n_layers=1",
            "model.n_heads=2",
            "model.n_kv_heads=2",
            "model.head_dim=16",
            "model.d_ff=64",
            "data.max_length=8",
        ],
    )
    # 6 N per token + attention 12 L H d T: N = 2 * 100 * 32 (embedding, head) + 4 * 32 * 32 + 3 * 32 * 64 + norms
    n = 2 * 100 * 32 + 4 * 32 * 32 + 3 * 32 * 64 + 3 * 32
    per_token = 6 * n + 12 * 1 * 2 * 16 * 8
    assert mfu.Utilization(cfg, 100, tmp_path)(1000.0) == pytest.approx(1000.0 * per_token / 1e9, rel=1e-6)
    # A step faster than the cached matmul (timed on a busy machine) becomes the peak: 100%, cached.
    fast = 1e9 / per_token * 3
    assert mfu.Utilization(cfg, 100, tmp_path)(fast) == pytest.approx(1.0)
    assert mfu.peak_flops(jax.devices()[0], "float32", tmp_path)[0] == pytest.approx(3e9)
    assert mfu.Utilization(cfg, 100, tmp_path)(fast / 2) == pytest.approx(0.5)
