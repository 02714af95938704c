"""The device mesh, the logical-to-mesh rules, and global batch assembly.

The model names logical axes only. This module is the one place that turns those names
into mesh axes, through `config.LogicalRules`. A logical axis whose length does not
divide by its mesh axes is replicated instead (a tiny demo vocabulary on 8 devices),
and a mesh axis is never used twice within one array.

Mesh axes, outer to inner: `data`, `fsdp`, `sequence` (the length of activations), `tensor`.
On several TPU slices (or GPU nodes) each axis is `mesh.<axis>` long inside a slice times
`mesh.dcn_<axis>` across slices, laid out so that each slice is one contiguous block.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxsft.config import LOGICAL_AXES, MESH_AXES, ConfigError, LogicalRules, MeshConfig


def _resolve(sizes: list[int], device_count: int, what: str) -> list[int]:
    """Fills the one -1 with what the fixed sizes leave of `device_count`."""
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"mesh: {device_count} {what} do not divide by the fixed axis sizes (product {known})")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ConfigError(f"mesh: {'*'.join(MESH_AXES)} = {math.prod(sizes)} but {device_count} {what} are present")
    return sizes


def mesh_shapes(cfg: MeshConfig, device_count: int, slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ici, dcn) sizes per mesh axis; the mesh axis is ici * dcn long.

    `mesh.<axis>` sizes (one -1 allowed) describe one slice; `mesh.dcn_<axis>` how the slices
    (or hosts) are laid out over the slow network. Devices that come in several slices
    while every dcn size is 1 put the slices on `data`: the only axis that tolerates DCN
    bandwidth on every model.
    """
    dcn = [getattr(cfg, f"dcn_{axis}") for axis in MESH_AXES]
    if math.prod(dcn) == 1 and slices > 1:
        dcn[MESH_AXES.index("data")] = slices
    if slices > 1 and math.prod(dcn) != slices:
        raise ConfigError(
            f"mesh: dcn sizes {dict(zip(MESH_AXES, dcn))} multiply to {math.prod(dcn)} "
            f"but the devices form {slices} slices"
        )
    if device_count % math.prod(dcn):
        raise ConfigError(
            f"mesh: {device_count} devices do not split into {math.prod(dcn)} DCN groups "
            f"(dcn sizes {dict(zip(MESH_AXES, dcn))})"
        )
    ici = _resolve(
        [getattr(cfg, axis) for axis in MESH_AXES],
        device_count // math.prod(dcn),
        "devices" if math.prod(dcn) == 1 else "devices per slice",
    )
    return tuple(ici), tuple(dcn)


def mesh_shape(cfg: MeshConfig, device_count: int, slices: int = 1) -> tuple[int, ...]:
    ici, dcn = mesh_shapes(cfg, device_count, slices)
    return tuple(i * d for i, d in zip(ici, dcn))


def _distinct(devices, attr: str) -> int:
    return len({getattr(d, attr, 0) for d in devices})


def hybrid_device_grid(ici: tuple[int, ...], dcn: tuple[int, ...], devices) -> np.ndarray:
    """The devices as an array of shape ici * dcn, each DCN group a contiguous ICI block.

    A DCN group is a TPU slice (`slice_index`), else a process (a GPU node). With neither
    (one process of fake CPU devices, as in the tests) consecutive runs of devices stand in
    for the groups, so the layout logic is the same one that runs on a pod.
    """
    groups = math.prod(dcn)
    for attr in ("slice_index", "process_index"):
        if _distinct(devices, attr) == groups:
            return mesh_utils.create_hybrid_device_mesh(
                ici, dcn, devices, process_is_granule=attr == "process_index", allow_split_physical_axes=True
            )
    if _distinct(devices, "process_index") > 1:
        raise ConfigError(
            f"mesh: dcn sizes {dict(zip(MESH_AXES, dcn))} ask for {groups} DCN groups, but the devices "
            f"form {_distinct(devices, 'slice_index')} slices over "
            f"{_distinct(devices, 'process_index')} processes"
        )
    n = len(devices) // groups
    blocks = [
        mesh_utils.create_device_mesh(ici, devices[g * n : (g + 1) * n], allow_split_physical_axes=True)
        for g in range(groups)
    ]
    layout = np.empty(dcn, dtype=object)
    for g, index in enumerate(np.ndindex(*dcn)):
        layout[index] = blocks[g]
    return np.block(layout.tolist())


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else list(devices)
    ici, dcn = mesh_shapes(cfg, len(devices), _distinct(devices, "slice_index"))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if math.prod(dcn) == 1:
        return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
    return Mesh(hybrid_device_grid(ici, dcn, devices), MESH_AXES, axis_types=axis_types)


def flax_rules(rules: LogicalRules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    """The rules in the form `flax.linen.logical_axis_rules` takes (for activation constraints)."""
    return tuple((name, getattr(rules, name) or None) for name in LOGICAL_AXES)


def mesh_spec(logical: P | tuple, shape: tuple[int, ...], rules: LogicalRules, mesh: Mesh) -> P:
    """Maps one array's logical axis names to mesh axes, replicating what cannot split evenly."""
    used: set[str] = set()
    out = []
    for name, length in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        # An axis the mesh lacks counts as size 1 (a mesh built by hand without `sequence`).
        axes = tuple(a for a in (getattr(rules, name) if name else ()) if a not in used and mesh.shape.get(a, 1) > 1)
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
        abstract_tree,
        logical_specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def batch_sharding(rules: LogicalRules, mesh: Mesh) -> NamedSharding:
    """Rows split over the batch axes; the length axis per the rules."""
    return NamedSharding(mesh, mesh_spec(("batch", "length"), (0, 0), rules, mesh))


def batch_axes_size(rules: LogicalRules, mesh: Mesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in rules.batch)


def global_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """The whole global batch, held by every process, as global arrays (each device takes its
    rows and length slice). A process that holds only some rows uses `global_batch_of_rows`."""
    rows = len(next(iter(batch.values())))
    return global_batch_of_rows(batch, sharding, np.arange(rows), rows)


def process_rows(sharding: NamedSharding, global_rows: int) -> np.ndarray:
    """The global batch rows that this process's devices hold, ascending (any mesh layout)."""
    rows: set[int] = set()
    length = sharding.mesh.devices.size  # any length the length axis's split divides
    for index in sharding.addressable_devices_indices_map((global_rows, length)).values():
        rows.update(range(global_rows)[index[0]])
    return np.array(sorted(rows), dtype=np.int64)


def global_batch_of_rows(
    batch: dict[str, np.ndarray], sharding: NamedSharding, row_ids: np.ndarray, global_rows: int
) -> dict[str, jax.Array]:
    """Global arrays of `global_rows` rows from the rows `row_ids` (ascending, a superset of
    `process_rows`) that this process holds: each device gets its rows (and length slice)."""

    def assemble(rows_BxT: np.ndarray) -> jax.Array:
        def device_part(index):
            wanted = np.arange(global_rows)[index[0]]
            return rows_BxT[np.searchsorted(row_ids, wanted)][:, index[1]]

        return jax.make_array_from_callback((global_rows,) + rows_BxT.shape[1:], sharding, device_part)

    return {k: assemble(v) for k, v in batch.items()}
