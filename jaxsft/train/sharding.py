"""The device mesh, the logical-to-mesh rules, and global batch assembly.

The model names logical axes only. This module is the one place that turns those names
into mesh axes, through `config.LogicalRules`. A logical axis whose length does not
divide by its mesh axes is replicated instead (a tiny demo vocabulary on 8 devices),
and a mesh axis is never used twice within one array.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxsft.config import LOGICAL_AXES, MESH_AXES, ConfigError, LogicalRules, MeshConfig


def mesh_shape(cfg: MeshConfig, device_count: int) -> tuple[int, ...]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"mesh: {device_count} devices do not divide by the fixed axis sizes (product {known})")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {device_count} devices are present")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def flax_rules(rules: LogicalRules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """The rules in the form `flax.linen.logical_axis_rules` takes (for activation constraints)."""
    return tuple((name, getattr(rules, name) or None) for name in LOGICAL_AXES)


def mesh_spec(logical: P | tuple, shape: tuple[int, ...], rules: LogicalRules, mesh: Mesh) -> P:
    """Maps one array's logical axis names to mesh axes, replicating what cannot split evenly."""
    used: set[str] = set()
    out = []
    for name, length in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        axes = tuple(a for a in (getattr(rules, name) if name else ()) if a not in used and mesh.shape[a] > 1)
        if axes and length % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            out.append(axes if len(axes) > 1 else axes[0])
        else:
            out.append(None)
    return P(*out)


def tree_shardings(abstract_tree, logical_specs, rules: LogicalRules, mesh: Mesh):
    """NamedShardings for a tree of ShapeDtypeStructs, given the matching tree of logical specs."""
    return jax.tree.map(
        lambda x, spec: NamedSharding(mesh, mesh_spec(spec, x.shape, rules, mesh)),
        abstract_tree, logical_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(rules: LogicalRules, mesh: Mesh) -> NamedSharding:
    """Rows split over the batch axes; the length axis per the rules."""
    return NamedSharding(mesh, mesh_spec(("batch", "length"), (0, 0), rules, mesh))


def batch_axes_size(rules: LogicalRules, mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in rules.batch)


def global_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows into global arrays (each process passes only its own)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
