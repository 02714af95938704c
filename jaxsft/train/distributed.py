"""Joining JAX's multi-process runtime before anything touches a device.

Three ways in, tried in order:
- explicit: `JAXSFT_COORDINATOR=host:port`, `JAXSFT_NUM_PROCESSES`, `JAXSFT_PROCESS_ID`
  (what `launch/local.sh` sets for N processes on one machine, and what a plain
  multi-node script sets by hand);
- a SLURM job step with more than one task, or a multi-host TPU slice: JAX reads the
  coordinator and ranks from the cluster's environment itself;
- otherwise one process, nothing to join.
On CPU, cross-process collectives go through gloo.
"""

from __future__ import annotations

import os

import jax

from jaxsft.config import ConfigError

EXPLICIT = ("JAXSFT_COORDINATOR", "JAXSFT_NUM_PROCESSES", "JAXSFT_PROCESS_ID")


def _explicit() -> tuple[str, int, int] | None:
    present = [k for k in EXPLICIT if os.environ.get(k)]
    if not present:
        return None
    if len(present) < len(EXPLICIT):
        missing = ", ".join(k for k in EXPLICIT if k not in present)
        raise ConfigError(f"multi-process launch: {', '.join(present)} set but {missing} missing")
    try:
        return (
            os.environ["JAXSFT_COORDINATOR"],
            int(os.environ["JAXSFT_NUM_PROCESSES"]),
            int(os.environ["JAXSFT_PROCESS_ID"]),
        )
    except ValueError:
        raise ConfigError("multi-process launch: JAXSFT_NUM_PROCESSES and JAXSFT_PROCESS_ID must be integers") from None


def _cluster() -> bool:
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_tasks > 1 or "," in tpu_hosts


def initialize() -> None:
    """Joins the runtime the environment describes (idempotent, a no-op for one process)."""
    if jax.distributed.is_initialized():
        return
    explicit = _explicit()
    if explicit is None and not _cluster():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit is None:
        jax.distributed.initialize()
    else:
        coordinator, count, index = explicit
        jax.distributed.initialize(coordinator, count, index)


def is_main() -> bool:
    """Process 0 writes the run's files and talks to the console."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """All processes reach this point before any goes on (a no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
