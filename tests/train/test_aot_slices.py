"""Multi-slice pre-flight: `--slices K` compiles on the same hybrid ICI x DCN mesh as training."""

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
