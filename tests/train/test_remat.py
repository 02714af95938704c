"""Every remat policy (host offload included) trains like no remat: same numbers, other memory."""

import dataclasses
import typing

import jax
import numpy as np
import pytest

from jaxsft.config import MeshConfig, Remat

from train_helpers import TINY_MODEL, Setup, make_batch


@pytest.fixture(scope="module")
def reference():
    batches = [make_batch(np.random.default_rng(0), 8, 32) for _ in range(2)]
    setup = Setup(devices=jax.devices()[:2], mesh_cfg=MeshConfig(data=1, fsdp=2))
    setup.run(batches)
    return batches, jax.tree.map(np.asarray, setup.state["params"])


@pytest.mark.parametrize("remat", [r for r in typing.get_args(Remat) if r != "none"])
def test_remat_policy_trains_like_no_remat(reference, remat):
    batches, expected = reference
    setup = Setup(
        model=dataclasses.replace(TINY_MODEL, remat=remat),
        devices=jax.devices()[:2],
        mesh_cfg=MeshConfig(data=1, fsdp=2),
    )
    setup.run(batches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), setup.state["params"], expected)
