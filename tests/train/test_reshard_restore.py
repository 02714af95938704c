"""A checkpoint written under one mesh restores onto another: fsdp=8 -> data x tensor on 4 -> 1 device."""

import jax
import numpy as np

from jaxsft.config import CheckpointConfig, DataConfig, MeshConfig
from jaxsft.data.pipeline import build_data
from jaxsft.train.checkpoint import Checkpointer

from train_helpers import Setup


def test_restore_onto_other_meshes(tmp_path, batches):
    data = build_data(
        DataConfig(synthetic_train_examples=64, synthetic_eval_examples=8, max_length=64),
        seed=0,
        cache_dir=tmp_path / "cache",
    )
    iterator = iter(data.train_dataset(4, seed=0))
    written = Setup(MeshConfig(data=1, fsdp=8))
    written.run(batches[:2])  # trained params and non-trivial Adam moments
    checkpointer = Checkpointer(tmp_path / "run", CheckpointConfig(every=1, async_save=False))
    checkpointer.save(2, written.state, iterator, force=True)
    checkpointer.close()
    expected = jax.device_get(written.state)

    for mesh_cfg, devices in (
        (MeshConfig(data=2, fsdp=1, tensor=2), jax.devices()[:4]),
        (MeshConfig(), jax.devices()[:1]),
    ):
        target = Setup(mesh_cfg, devices=devices)
        restored, same_layout = Checkpointer(tmp_path / "run", CheckpointConfig()).restore(
            2, target.plan.abstract, iterator
        )
        assert same_layout
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), expected)
        leaves = jax.tree.leaves(restored)
        assert {d for x in leaves for d in x.sharding.device_set} == set(devices)
        assert all(x.sharding == s for x, s in zip(leaves, jax.tree.leaves(target.plan.shardings)))
    iterator.close()
