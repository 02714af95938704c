"""Mesh construction (sequence axis, hybrid ICI x DCN meshes) and training on those meshes.

Sharded runs must train like one device (DESIGN invariant 7): a `sequence` axis splits the
length of every activation and GSPMD gathers keys and values for attention; a hybrid mesh
only changes which device sits where.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.config import MESH_AXES, ConfigError, MeshConfig
from jaxsft.config_load import from_dict
from jaxsft.train import sharding
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

from test_trainer import TINY
from train_helpers import Setup, make_batch


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    """What mesh building reads from a device: enough to lay out a pod without one."""

    id: int
    slice_index: int
    process_index: int = 0
    platform: str = "cpu"
    device_kind: str = "cpu"


def _fake_pod(slices: int, per_slice: int) -> list[FakeDevice]:
    # Listed slice-interleaved, as a runtime may: the grid must still group by slice.
    return [FakeDevice(id=s * per_slice + i, slice_index=s) for i in range(per_slice) for s in range(slices)]


@pytest.fixture(scope="module")
def one_device_run():
    rng = np.random.default_rng(0)
    batches = [make_batch(rng, rows=8, length=32) for _ in range(3)]
    reference = Setup(devices=jax.devices()[:1])
    return batches, reference.run(batches), reference.state["params"]


def _close(a, b, tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol), a, b)


def test_sizes_resolve_per_slice_and_multiply_with_dcn():
    assert sharding.mesh_shapes(MeshConfig(fsdp=2, sequence=2), 8) == ((2, 2, 2, 1), (1, 1, 1, 1))
    ici, dcn = sharding.mesh_shapes(MeshConfig(data=-1, fsdp=4, dcn_data=2), 16)
    assert (ici, dcn) == ((2, 4, 1, 1), (2, 1, 1, 1))
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=4, dcn_data=2), 16) == (4, 4, 1, 1)
    # Several slices and no dcn sizes: the slices go on `data`.
    assert sharding.mesh_shapes(MeshConfig(data=1, fsdp=-1), 16, slices=4) == ((1, 4, 1, 1), (4, 1, 1, 1))
    with pytest.raises(ConfigError, match="multiply to 2 but the devices form 4 slices"):
        sharding.mesh_shapes(MeshConfig(dcn_fsdp=2), 16, slices=4)
    with pytest.raises(ConfigError, match="devices per slice"):
        sharding.mesh_shapes(MeshConfig(data=1, fsdp=3, dcn_data=2), 8)


def test_bad_dcn_size_fails_in_config():
    with pytest.raises(ConfigError, match="mesh.dcn_fsdp=0"):
        from_dict({"mesh": {"dcn_fsdp": 0}})
    assert from_dict({"mesh": {"sequence": 2, "rules": {"length": ["sequence"]}}}).mesh.sequence == 2


def test_hybrid_grid_keeps_each_slice_a_contiguous_block():
    devices = _fake_pod(slices=4, per_slice=4)
    ici, dcn = sharding.mesh_shapes(MeshConfig(data=1, fsdp=-1, dcn_data=2, dcn_fsdp=2), 16, slices=4)
    grid = sharding.hybrid_device_grid(ici, dcn, devices)
    assert grid.shape == (2, 8, 1, 1)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)[:, :, 0, 0]
    # dcn (2 x 2) outer, ici (1 x 4) inner: one slice per 1 x 4 block, in slice order.
    np.testing.assert_array_equal(slice_of, np.repeat(np.arange(4).reshape(2, 2), [4, 4], axis=1))


def test_hybrid_grid_by_process_when_devices_have_no_slices():
    devices = [FakeDevice(id=i, slice_index=0, process_index=i // 4) for i in range(8)]
    grid = sharding.hybrid_device_grid((1, 4, 1, 1), (2, 1, 1, 1), devices)
    process_of = np.vectorize(lambda d: d.process_index)(grid)[:, :, 0, 0]
    np.testing.assert_array_equal(process_of, [[0] * 4, [1] * 4])


def test_hybrid_mesh_on_cpu_devices_groups_consecutive_devices():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=4, dcn_data=2))
    assert dict(mesh.shape) == dict(zip(MESH_AXES, (2, 4, 1, 1)))
    ids = np.vectorize(lambda d: d.id)(mesh.devices)[:, :, 0, 0]
    assert [set(row) for row in ids.tolist()] == [set(range(4)), set(range(4, 8))]


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(data=1, fsdp=4, sequence=2),
        pytest.param(MeshConfig(data=1, sequence=8), marks=pytest.mark.slow),
        pytest.param(MeshConfig(data=1, fsdp=1, sequence=2, tensor=2, dcn_fsdp=2), marks=pytest.mark.slow),
    ],
    ids=["sequence2_fsdp4", "sequence8", "hybrid_dcn_fsdp2_seq2_tp2"],
)
def test_sequence_and_hybrid_meshes_train_like_one_device(one_device_run, mesh_cfg):
    batches, reference_losses, reference_params = one_device_run
    sharded = Setup(mesh_cfg)
    assert sharded.batch_sharding.spec[1] == "sequence"  # the length axis is really split
    # Weights split over fsdp and sequence alike (dcn included), and over tensor.
    q_proj = sharded.state["params"]["blocks"]["attn"]["q_proj"]  # [layers, embed, heads, head_dim]
    splits = sharded.mesh.shape["fsdp"] * sharded.mesh.shape["sequence"] * sharded.mesh.shape["tensor"]
    assert q_proj.size == q_proj.addressable_shards[0].data.size * splits
    global_inputs = sharding.global_batch(batches[0], sharded.batch_sharding)["inputs"]
    assert global_inputs.addressable_shards[0].data.shape[1] == 32 // mesh_cfg.sequence
    np.testing.assert_array_equal(np.asarray(global_inputs), batches[0]["inputs"])
    np.testing.assert_allclose(sharded.run(batches), reference_losses, rtol=2e-5)
    _close(sharded.state["params"], reference_params, 2e-5)


@pytest.mark.slow
def test_trainer_with_a_sequence_axis_equals_data_parallel(tmp_path, monkeypatch):
    """`jaxsft train` end to end (data pipeline, batch assembly, eval) under mesh.sequence=2."""
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path / "cache"))
    runs = {}
    for name, mesh in (("dp", ["mesh.data=8"]), ("seq", ["mesh.data=1", "mesh.fsdp=4", "mesh.sequence=2"])):
        run = tmp_path / name
        train(config_load.load(None, TINY + mesh + [f"train.run_dir={run}", "train.steps=2", "train.eval_every=2"]))
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (
            [r["loss"] for r in records if "loss" in r],
            [r["eval_loss"] for r in records if "eval_loss" in r],
            read_state(run)["params"],
        )
    np.testing.assert_allclose(runs["seq"][0], runs["dp"][0], rtol=2e-5)
    np.testing.assert_allclose(runs["seq"][1], runs["dp"][1], rtol=2e-5)
    assert runs["dp"][1]  # eval ran
    _close(runs["seq"][2], runs["dp"][2], 2e-5)
