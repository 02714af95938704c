"""Model FLOPs utilisation: the model flops of the trained tokens per second over the peak.

Contract:
    Utilization(cfg, vocab_size, cache_dir, devices)(tokens_per_second) -> MFU in [0, 1]
    peak_flops(device, dtype, cache_dir) -> (peak FLOP/s of one device, where the number comes from)

Model flops per token are the pre-flight's (aot.model_flops: 6 N + attention, 4 N with
PEFT), so `jaxsft compile` and `jaxsft train` speak of the same work. The peak is the
dense bf16 figure of the named table for TPUs and GPUs (aot.CHIPS, aot.GPUS). Anything
else (a CPU host, an unlisted GPU) gets a measured matmul in the model's compute dtype,
taken once per machine and cached in JAXSFT_CACHE (`peak_flops.json`): a CPU's "peak" is
what XLA reaches on a large matmul, so a CPU MFU near 100% means the step runs at that speed.
A matmul timed while other jobs share the cores reads low; when a step then runs faster
than the cached peak, the step's own FLOP/s become the peak (in memory and in the cache),
so MFU never reads above 100% and the stale figure is replaced.
All CPU devices of a process share its cores: the host's peak counts once per process.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxsft.config import Config
from jaxsft.model import blas
from jaxsft.train import aot

_MATMUL = 1024  # [n, n] @ [n, n]: 2 GFLOP, a few tenths of a second on two CPU cores
# device_kind as JAX reports it -> aot.CHIPS name (Cloud TPU's "lite" chips are the e-series)
_TPU_KINDS = {
    "TPU v4": "v4",
    "TPU v5": "v5p",
    "TPU v5p": "v5p",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
}


def _table_peak(device) -> float | None:
    kind = device.device_kind
    if device.platform == "tpu" and kind in _TPU_KINDS:
        return aot.CHIPS[_TPU_KINDS[kind]].peak_flops
    if device.platform == "gpu":
        name = next((n for n in aot.GPUS if n in kind.lower()), None)
        return aot.GPUS[name][1] if name else None
    return None


def measured_matmul_flops(dtype: str, device=None, repeats: int = 5) -> float:
    """The best FLOP/s of a jitted square matmul on `device` (default: the first), done as the
    step does its matmuls (model/blas.py: the BLAS for float32 on a single CPU device)."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((_MATMUL, _MATMUL), dtype), device)
    matmul = jax.jit(lambda x: blas.matmul(x, x))
    matmul(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * _MATMUL**3 / best


def _peak_key(device, dtype: str) -> str:
    operand = jax.ShapeDtypeStruct((1, 1), dtype)
    on_blas = device.platform == "cpu" and blas.in_use(operand, operand)
    return (
        f"{device.platform}|{device.device_kind}|{platform.processor() or platform.machine()}|{os.cpu_count()}|{dtype}"
        + ("|blas" if on_blas else "")  # a peak measured on XLA's dot is not this one
    )


def _read(path: Path) -> dict:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _write(path: Path, cached: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cached, indent=1))
    tmp.replace(path)


def peak_flops(device, dtype: str, cache: Path) -> tuple[float, str]:
    table = _table_peak(device)
    if table:
        return table, f"{device.device_kind} bf16 peak"
    key, path = _peak_key(device, dtype), cache / "peak_flops.json"
    cached = _read(path)
    if not isinstance(cached.get(key), (int, float)):
        cached[key] = measured_matmul_flops(dtype, device)
        _write(path, cached)
    return float(cached[key]), f"measured {dtype} matmul"


def raise_measured_peak(device, dtype: str, cache: Path, flops: float) -> None:
    """Records `flops` as the cached peak when it is higher (see the module docstring)."""
    key, path = _peak_key(device, dtype), cache / "peak_flops.json"
    cached = _read(path)
    if flops > cached.get(key, 0.0):
        _write(path, {**cached, key: flops})


class Utilization:
    def __init__(self, cfg: Config, vocab_size: int, cache: Path, devices=None):
        devices = devices or jax.devices()
        positions = cfg.train.global_batch_size * cfg.data.max_length
        self.flops_per_token = aot.model_flops(cfg, vocab_size)[0] / positions
        self.peak, self.source = peak_flops(devices[0], cfg.model.dtype, cache)
        self.measured = self.source.startswith("measured")
        self.device, self.dtype, self.cache = devices[0], cfg.model.dtype, cache
        # CPU devices of one process share its cores; accelerators each bring their own.
        self.per_peak = jax.process_count() if devices[0].platform == "cpu" else len(devices)
        self.peak *= self.per_peak

    def __call__(self, tokens_per_second: float) -> float:
        flops = tokens_per_second * self.flops_per_token
        if self.measured and flops > self.peak:  # the cached matmul was timed on a busy machine
            self.peak = flops
            raise_measured_peak(self.device, self.dtype, self.cache, flops / self.per_peak)
        return flops / self.peak
