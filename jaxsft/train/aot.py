"""Pre-flight: compile the real train step for a TPU slice or a GPU cluster on a CPU host.

`jax.experimental.topologies` (with libtpu installed, the `tpu` extra) describes a TPU
slice without any TPU attached; the train step is lowered and compiled against those
devices exactly as `jaxsft train` would build it (same state plan, shardings, rules,
remat), and XLA's own memory and cost analyses say what each chip would hold and do.
No array is ever allocated.

Names follow Cloud TPU: `v4-32` and `v5p-32` count TensorCores (2 per chip), `v5e-16`
and `v6e-16` count chips. `--slices K` asks for K such slices joined over DCN; the mesh is
then the hybrid ICI x DCN mesh `jaxsft train` builds on a pod (`sharding.make_mesh`), with
the slices on `mesh.dcn_*` (on `data` when those are all 1).

GPU clusters: `--gpu h100x8 --hosts N` compiles for N hosts of 8 H100s with compile-only
CUDA devices (the CUDA PJRT plugin, `pip install -e '.[gpu-aot]'`, described by XLA's
H100 target config in gpu_specs/); no GPU, CUDA runtime or ptxas is needed. Without a
device XLA cannot autotune its GEMMs: memory is the default kernels', an estimate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsft.config import Config, ConfigError
from jaxsft.model import kernels, pretrained
from jaxsft.model.transformer import param_count
from jaxsft.quiet import benign_stderr_dropped, tpu_present
from jaxsft.train import program as program_lib
from jaxsft.train import sharding

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    cores_in_name: int  # TensorCores per chip counted by the slice name
    hbm_bytes: int
    peak_flops: float  # dense bf16 per chip


CHIPS = {
    "v4": Chip(2, 32 * GIB, 275e12),
    "v5p": Chip(2, 95 * GIB, 459e12),
    "v5e": Chip(1, 16 * GIB, 197e12),
    "v6e": Chip(1, 32 * GIB, 918e12),
}
# name: (XLA target config in gpu_specs/, dense bf16 peak per GPU)
GPUS = {"h100": ("h100_sxm.txtpb", 989e12)}
SHAPES_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
}
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


@dataclasses.dataclass
class Report:
    label: str
    devices: int
    params_bytes: int  # per device
    optimizer_bytes: int
    argument_bytes: int  # per device, from XLA: params + optimizer state + batch
    temp_bytes: int  # activations and other temporaries
    total_bytes: int
    capacity_bytes: int
    model_flops: float  # per step, all devices: 6 N per token + attention
    hardware_flops: float  # model flops plus what remat recomputes
    step_seconds_at_peak: float  # hardware flops at every chip's peak
    mfu_at_peak: float  # model / hardware flops: the best MFU this configuration allows

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.capacity_bytes


def topology(name: str, slices: int = 1):
    """(devices, Chip) for a slice name such as `v5p-32`; a one-line error for anything else."""
    kind, _, size = name.partition("-")
    if kind not in CHIPS or not size.isdigit():
        raise ConfigError(
            f"--topology {name}: expected <type>-<size> with type one of {', '.join(CHIPS)} (e.g. v5p-32)"
        )
    chip = CHIPS[kind]
    chips = int(size) // chip.cores_in_name
    shapes = SHAPES_3D if kind in ("v4", "v5p") else SHAPES_2D
    if chips not in shapes:
        raise ConfigError(
            f"--topology {name}: {chips} chips is not a {kind} slice shape (chips: {', '.join(map(str, shapes))})"
        )
    from jax.experimental import topologies

    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's host lookup
    no_tpu = not tpu_present()
    if no_tpu:
        # libtpu takes a host-wide lock file when it loads, so a second pre-flight on the same
        # host (a parallel sweep, a test worker) failed; with no TPU attached it guards nothing.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        # With no TPU, libtpu's "could not determine TPU accelerator type" is expected.
        with benign_stderr_dropped() if no_tpu else contextlib.nullcontext():
            topo = topologies.get_topology_desc(
                f"{kind}:{shapes[chips]}", "tpu", **({"num_slices": slices} if slices > 1 else {})
            )
    except Exception as e:  # no libtpu, or a libtpu that does not know this chip
        raise ConfigError(
            f"--topology {name}: TPU compiler unavailable ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); install the tpu extra: pip install -e '.[tpu]'"
        ) from None
    return list(topo.devices), chip, chips * slices


def _per_device_bytes(abstract_tree) -> int:
    def shard_bytes(x):
        shape = x.sharding.shard_shape(x.shape)
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize

    return sum(shard_bytes(x) for x in jax.tree.leaves(abstract_tree))


def gpu_topology(name: str, hosts: int = 1):
    """(devices, Chip, GPUs) for `h100x8` (GPUs per host) on `hosts` hosts: compile-only CUDA devices."""
    kind, _, per_host = name.partition("x")
    if kind not in GPUS or not per_host.isdigit() or int(per_host) < 1 or hosts < 1:
        raise ConfigError(
            f"--gpu {name} (--hosts {hosts}): expected <gpu>x<GPUs per host> with gpu one of "
            f"{', '.join(GPUS)} (e.g. h100x8) and at least one host"
        )
    spec_file, peak = GPUS[kind]
    spec = (Path(__file__).parent / "gpu_specs" / spec_file).read_text()
    # The plugin refuses to register on a host without CUDA unless told this is compile-only work.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", target_config=spec, topology=f"1x{hosts}x{per_host}")
    except Exception as e:  # no CUDA PJRT plugin, or one that cannot read this description
        raise ConfigError(
            f"--gpu {name}: GPU compiler unavailable ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); install it: pip install -e '.[gpu-aot]'"
        ) from None
    hbm = int(re.search(r"device_memory_size: (\d+)", spec).group(1))
    devices = list(topo.devices)
    return devices, Chip(1, hbm, peak), len(devices)


def model_flops(cfg: Config, vocab_size: int) -> tuple[float, float]:
    """(model, hardware) flops per step.

    Model flops: 6 N per position (forward 2N, backward 4N) plus attention scores and
    values (12 L H d T per position, forward and backward, over the full square the XLA
    kernel computes). Hardware flops add the forward pass that remat recomputes: all of
    it under `full`, the non-matmul part (negligible) under `dots_saveable`.
    XLA's own cost analysis is not used: it counts a scanned layer once, not L times.
    With PEFT the frozen weights get no weight gradient: 4 N per position instead of 6 N
    (the adapters' own flops are negligible; counted the same for `freeze`, an upper bound).
    """
    m = cfg.model
    tokens = cfg.train.global_batch_size * cfg.data.max_length
    dense = 2 * param_count(m, vocab_size) * tokens
    attention = 4 * m.n_layers * m.n_heads * m.head_dim * cfg.data.max_length * tokens
    model = (2 if m.peft.method != "none" else 3) * dense + 3 * attention
    recompute = dense + attention if m.remat == "full" else 0.0
    return model, model + recompute


def compile_for(cfg: Config, devices, chip: Chip, chips: int, label: str = "") -> Report:
    cfg = dataclasses.replace(cfg, model=pretrained.resolve_config(cfg.model))  # presets, init_from shapes
    vocab_size = program_lib.vocab_size_without_data(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    program_lib.check_batch(cfg, mesh)
    program = program_lib.build(cfg, vocab_size, mesh)
    plan = program.plan
    try:
        # The program `jaxsft train` runs: PEFT's frozen argument, micro-batch sharding and all.
        # Traced for the target: `auto` attention is the kernel the devices would run.
        with kernels.compiling_for(devices[0].platform):
            compiled = program.compile_train()
    except jax.errors.JaxRuntimeError as e:
        first = str(e).splitlines()[0][:300]
        if "RESOURCE_EXHAUSTED" in first and "HBM" in first:
            raise ConfigError(f"does not fit: {label or 'train step'}: {first.split(': ', 1)[-1]}") from None
        raise ConfigError(f"{label or 'train step'}: the TPU compiler refused it: {first}") from None
    memory = compiled.memory_analysis()
    useful, executed = model_flops(cfg, vocab_size)
    total = (
        memory.argument_size_in_bytes
        + memory.temp_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
    )
    return Report(
        label=label,
        devices=len(devices),
        params_bytes=_per_device_bytes(plan.abstract["params"]) + _per_device_bytes(plan.frozen_abstract or {}),
        optimizer_bytes=_per_device_bytes(plan.abstract["opt_state"]),
        argument_bytes=memory.argument_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        total_bytes=total,
        capacity_bytes=int(chip.hbm_bytes * chips / len(devices)),
        model_flops=useful,
        hardware_flops=executed,
        step_seconds_at_peak=executed / (chip.peak_flops * chips),
        mfu_at_peak=useful / executed,
    )


def format_report(r: Report) -> list[str]:
    g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    return [
        f"{r.label or 'step'} on {r.devices} devices, per device:",
        f"  parameters      {g(r.params_bytes)}",
        f"  optimizer state {g(r.optimizer_bytes)}",
        f"  arguments       {g(r.argument_bytes)} (parameters, optimizer state, batch)",
        f"  temporaries     {g(r.temp_bytes)} (activations, gradients, workspace)",
        f"  total           {g(r.total_bytes)} of {g(r.capacity_bytes)} HBM ({'fits' if r.fits else 'DOES NOT FIT'})",
        f"  flops per step  {r.model_flops:.3e} model, {r.hardware_flops:.3e} with remat; "
        f"at peak {r.step_seconds_at_peak * 1e3:.1f} ms/step, MFU {r.mfu_at_peak:.1%}",
    ]


def sweep_table(reports: list[Report]) -> list[str]:
    header = (
        f"{'variant':<40} {'params':>8} {'optim':>8} {'temp':>8} {'total':>8} {'HBM':>7} {'ms@peak':>8} {'MFU':>6} fits"
    )
    rows = [
        f"{r.label[:40]:<40} {r.params_bytes / GIB:8.2f} {r.optimizer_bytes / GIB:8.2f} {r.temp_bytes / GIB:8.2f} "
        f"{r.total_bytes / GIB:8.2f} {r.capacity_bytes / GIB:7.1f} {r.step_seconds_at_peak * 1e3:8.1f} "
        f"{r.mfu_at_peak:6.1%} {'yes' if r.fits else 'NO'}"
        for r in reports
    ]
    return [header + "   (GiB per device)"] + rows


__all__ = [
    "CHIPS",
    "GPUS",
    "Report",
    "compile_for",
    "format_report",
    "gpu_topology",
    "model_flops",
    "sweep_table",
    "topology",
]
