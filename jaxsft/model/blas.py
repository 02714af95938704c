"""float32 matmuls on the CPU done by the machine's BLAS (an XLA FFI custom call), XLA's dot elsewhere.

Job: `matmul(a, b, trans_a, trans_b)` is `op(a) @ op(b)` (`jnp.matmul`, a batch of them over
equal leading axes), differentiable, with the same numbers as XLA's dot up to summation order.
Lowered for the CPU it calls `cblas_sgemm`; lowered for any other platform (a TPU or GPU
program, also one compiled ahead of time from a CPU host) it is XLA's dot
(`lax.platform_dependent` picks at lowering).

Why: XLA's CPU dot (YNNPACK) runs the train step's large float32 matmuls at 98-142 GFLOP/s on
the 2-core CI machine, where the OpenBLAS numpy bundles runs the same shapes at 129-152
through this call, with the transposes of a weight gradient as BLAS flags instead of copies
(bench/NOTES.md, round 6). jaxlib is built without oneDNN (`--xla_cpu_use_onednn` changes
nothing), so there is no flag that does this.

Where from: the handler (blas_sgemm.cc, XLA's header-only FFI API that jaxlib ships) is
compiled with the machine's C++ compiler on first use and cached in
`$JAXSFT_CACHE/blas/` (3 s, once per machine, CPU and jaxlib version: it is built for this CPU,
`-march=native`); the BLAS is the OpenBLAS inside numpy's wheel
(`numpy.libs/libscipy_openblas64_*.so`), else a system libopenblas. The same file holds the
xla attention fused for the CPU (`ATTENTION_FWD` / `ATTENTION_BWD`, called by model/attention.py).
Without a compiler or a BLAS, `matmul` is XLA's dot and one warning says why.

`JAXSFT_CPU_MATMUL` chooses: `auto` (default) uses the BLAS for float32 on a single CPU
device (several CPU devices mean a sharded program, which XLA partitions and a custom call
would make it replicate), `blas` wherever it can, `xla` never. It is read when a function is
traced (jit caches the trace), so set it before the program is built.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxlib import version as jaxlib_version

from jaxsft.cache import cache_dir

log = logging.getLogger(__name__)

MODE_ENV = "JAXSFT_CPU_MATMUL"
TARGET = "jaxsft_sgemm"
# The fused float32 attention in the same file (model/attention.py calls them).
ATTENTION_FWD, ATTENTION_BWD = "jaxsft_attention_fwd", "jaxsft_attention_bwd"
# Each FFI target and the handler symbol blas_sgemm.cc defines for it.
_HANDLERS = {TARGET: "JaxsftSgemm", ATTENTION_FWD: "JaxsftAttentionFwd", ATTENTION_BWD: "JaxsftAttentionBwd"}
_SOURCE = Path(__file__).with_name("blas_sgemm.cc")


# (library file pattern or name, cblas_sgemm symbol, 64-bit integers, its set-threads symbol)
_BLASES = (
    ("numpy.libs/libscipy_openblas64_*.so", "scipy_cblas_sgemm64_", True, "scipy_openblas_set_num_threads64_"),
    ("openblas", "cblas_sgemm", False, "openblas_set_num_threads"),
)


def _find_sgemm() -> tuple[ctypes._CFuncPtr, bool] | None:
    """(cblas_sgemm, whether its integers are 64-bit), or None; the BLAS set to one thread.

    One thread: blas_sgemm.cc splits each matmul over XLA's own threads. This is process-wide,
    so numpy's own matmuls in a process that trains on the CPU run on one core."""
    import numpy as np

    site = Path(np.__file__).parent.parent
    for pattern, symbol, ilp64, set_threads in _BLASES:
        paths = sorted(glob.glob(str(site / pattern))) if "/" in pattern else [ctypes.util.find_library(pattern)]
        for path in filter(None, paths):
            try:
                lib = ctypes.CDLL(path)
                sgemm, set_threads = getattr(lib, symbol), getattr(lib, set_threads)
            except (OSError, AttributeError):
                continue
            set_threads(ctypes.c_int(1))
            return sgemm, ilp64
    return None


def _cpu_identity() -> str:
    """The CPU the handler is compiled for (`-march=native`): a cache shared by machines of other
    CPUs must not hand them its build."""
    try:
        with open("/proc/cpuinfo") as info:
            return platform.machine() + "".join(
                sorted({line for line in info if line.startswith(("flags", "Features"))})
            )
    except OSError:
        return platform.machine() + platform.processor()


def _build() -> Path:
    """The compiled handler, built into the cache on first use (atomic: concurrent builds agree)."""
    # -fno-trapping-math lets the compiler vectorise the attention's exp (bench/NOTES.md, round 12);
    # a compiler that refuses -march=native still builds the handler, for the generic CPU.
    flags = ["-O3", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-std=c++17", "-w"]
    identity = [_SOURCE.read_bytes(), jaxlib_version.__version__, jax.ffi.include_dir(), _cpu_identity(), *flags]
    key = hashlib.sha256(b"\0".join(x if isinstance(x, bytes) else x.encode() for x in identity)).hexdigest()[:16]
    out = cache_dir() / "blas" / f"jaxsft_sgemm_{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    command = [os.environ.get("CXX", "c++"), *flags, "-I", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
    try:
        for arch in (["-march=native"], []):
            done = subprocess.run(command + arch, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        else:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"{command[0]} exited with {done.returncode}: {last}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def available() -> bool:
    """Whether the BLAS call is registered with XLA (built, loaded, given a BLAS); warns once if not."""
    try:
        sgemm = _find_sgemm()
        if sgemm is None:
            raise OSError("no BLAS found (numpy's bundled OpenBLAS, libopenblas, libcblas)")
        lib = ctypes.CDLL(str(_build()))
        lib.jaxsft_set_sgemm(ctypes.cast(sgemm[0], ctypes.c_void_p), ctypes.c_int(int(sgemm[1])))
        for target, symbol in _HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, subprocess.SubprocessError, AttributeError) as err:
        log.warning("jaxsft: CPU matmuls stay on XLA's dot (%s: %s)", type(err).__name__, err)
        return False
    return True


def _mode() -> str:
    mode = os.environ.get(MODE_ENV, "auto")
    if mode not in ("auto", "blas", "xla"):
        raise ValueError(f"{MODE_ENV}={mode!r}: expected auto, blas or xla")
    return mode


def in_use(a, b) -> bool:
    """Whether `matmul(a, b)` calls the BLAS when lowered for the CPU (decided at trace time)."""
    mode = _mode()
    if mode == "xla" or a.dtype != jnp.float32 or b.dtype != jnp.float32:
        return False
    if mode == "auto" and (jax.default_backend() != "cpu" or jax.device_count() != 1):
        return False
    return available()


def _op(x, trans: bool):
    return x.swapaxes(-1, -2) if trans else x


def _xla(a, b, trans_a: bool, trans_b: bool, preferred_element_type=None):
    return jnp.matmul(_op(a, trans_a), _op(b, trans_b), preferred_element_type=preferred_element_type)


def _sgemm(a, b, trans_a: bool, trans_b: bool):
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _blas_matmul(a, b, trans_a: bool, trans_b: bool):
    return jax.lax.platform_dependent(
        a, b, cpu=lambda a, b: _sgemm(a, b, trans_a, trans_b), default=lambda a, b: _xla(a, b, trans_a, trans_b)
    )


def _blas_matmul_fwd(a, b, trans_a, trans_b):
    return _blas_matmul(a, b, trans_a, trans_b), (a, b)


def _blas_matmul_bwd(trans_a, trans_b, residuals, g):
    a, b = residuals
    d_a = _blas_matmul(b, g, trans_b, True) if trans_a else _blas_matmul(g, b, False, not trans_b)
    d_b = _blas_matmul(g, a, True, trans_a) if trans_b else _blas_matmul(a, g, not trans_a, False)
    return d_a, d_b


_blas_matmul.defvjp(_blas_matmul_fwd, _blas_matmul_bwd)


def matmul(a, b, trans_a: bool = False, trans_b: bool = False, preferred_element_type=None):
    """op(a) @ op(b), op a transpose of the last two axes where asked; a and b of rank >= 2 with the
    same leading (batch) axes, as in `jnp.matmul`. The BLAS's where `in_use`."""
    batched_alike = a.ndim >= 2 and a.ndim == b.ndim and a.shape[:-2] == b.shape[:-2]
    if batched_alike and preferred_element_type in (None, jnp.float32) and in_use(a, b):
        return _blas_matmul(a, b, trans_a, trans_b)
    return _xla(a, b, trans_a, trans_b, preferred_element_type)
