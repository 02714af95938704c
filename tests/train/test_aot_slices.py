"""Multi-slice pre-flight: `--slices K` compiles on the same hybrid ICI x DCN mesh as training."""

import os
import subprocess
import sys

import pytest

from jaxsft import config_load
from jaxsft.config import ConfigError
from jaxsft.model.transformer import param_count
from jaxsft.train import aot, sharding

pytest.importorskip("libtpu", reason="pip install -e '.[tpu]'")

SMALL = [
    "model.vocab_size=512",
    "model.d_model=256",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=4",
    "model.head_dim=64",
    "model.d_ff=512",
    "data.max_length=256",
    "train.global_batch_size=8",
]


@pytest.fixture(scope="module")
def two_slices():
    return aot.topology("v5e-4", slices=2)


def _slice_rows(mesh):
    return [sorted({d.slice_index for d in block.flat}) for block in mesh.devices]


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_slices_go_on_data_unless_told(two_slices):
    devices, chip, chips = two_slices
    cfg = config_load.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=4"])
    mesh = sharding.make_mesh(cfg.mesh, devices)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == (2, 4)
    assert _slice_rows(mesh) == [[0], [1]]  # one data replica per slice: only gradients cross DCN
    report = aot.compile_for(cfg, devices, chip, chips)
    assert report.params_bytes == param_count(cfg.model, 512) * 4 // 4 and report.fits


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_fsdp_over_dcn_splits_state_over_both_slices(two_slices):
    devices, chip, chips = two_slices
    cfg = config_load.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=4", "mesh.dcn_fsdp=2"])
    mesh = sharding.make_mesh(cfg.mesh, devices)
    assert (mesh.shape["data"], mesh.shape["fsdp"]) == (1, 8)
    report = aot.compile_for(cfg, devices, chip, chips)
    assert report.params_bytes == param_count(cfg.model, 512) * 4 // 8


def test_dcn_sizes_must_match_the_slices(two_slices):
    cfg = config_load.load(None, SMALL + ["mesh.data=1", "mesh.fsdp=2", "mesh.dcn_fsdp=4"])
    with pytest.raises(ConfigError, match="multiply to 4 but the devices form 2 slices"):
        sharding.make_mesh(cfg.mesh, two_slices[0])


def test_a_second_pre_flight_runs_while_another_process_holds_libtpu():
    """libtpu locks /tmp/libtpu_lockfile when it loads; on a host with no TPU the pre-flight
    does not take it, so a parallel sweep (or a second test worker) is not refused."""
    env = {k: v for k, v in os.environ.items() if k != "ALLOW_MULTIPLE_LIBTPU_LOAD"}
    env.update(JAX_PLATFORMS="cpu", TPU_WORKER_HOSTNAMES="localhost")
    hold = (
        "import time\nfrom jax.experimental import topologies\n"
        "topologies.get_topology_desc('v5e:2x2', 'tpu'); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        if holder.stdout.readline().strip() != b"held":
            pytest.skip("another process holds libtpu's lock file")
        second = subprocess.run(
            [sys.executable, "-c", "from jaxsft.train import aot; print(len(aot.topology('v5e-4')[0]))"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 0, second.stderr[-500:]
        assert second.stdout.split()[-1] == "4"
    finally:
        holder.kill()
        holder.wait()
