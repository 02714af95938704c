"""A quiet start on a host without accelerators: only what a user must see reaches stderr.

The CLI calls `quiet_start(verb)` before anything imports JAX. Three sources of benign
noise on a CPU host, each silenced at its source and only there:

- The TPU and CUDA runtimes (the `tpu` and `gpu-aot` extras) probe for hardware when JAX
  starts its backends: libtpu's "could not determine TPU accelerator type / worker
  hostnames" and the CUDA plugin's "Unable to load CUDA" traceback. With no accelerator
  on the machine (JAX's own checks: NVIDIA and AMD device nodes, Google's PCI vendor id)
  and `JAX_PLATFORMS` unset, `JAX_PLATFORMS=cpu` is set, so those backends are never
  started. `jaxsft compile` is left alone (its pre-flight uses those runtimes); so is any
  `JAX_PLATFORMS` the user set.
- The CUDA plugin's libraries log "cudart_stub.cc ... Could not find cuda drivers" from
  C++ when they load (at `import jax` and at plugin registration), before absl logging is
  set up, straight to file descriptor 2. On such a host those loads run with descriptor 2
  captured; every other line is replayed unchanged.
- Orbax logs, through absl, that a read-only checkpoint manager changes its options and
  that a step has no `_CHECKPOINT_METADATA` (jaxsft's checkpoints are verified by their
  own checksums, checkpoint.py). A logging filter drops exactly those messages, and
  also Orbax's ERROR lines for a checkpoint write that failed part-way (one per writer
  thread, each with the whole error): jaxsft stops the run with that error in one line
  (checkpoint.py, exit code 6), so they only repeat it. After such a failure TensorStore's
  pending writes still call back into Orbax's closed event loop, and Python prints each
  "RuntimeError: Event loop is closed" through `sys.excepthook`: the hook drops exactly
  that error raised in asyncio's `call_soon_threadsafe`, and passes everything else on.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
# Lines of a C++ library's log that are benign when no accelerator is present.
_BENIGN_STDERR = re.compile(
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers|"
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called"
)
_BENIGN_ORBAX = re.compile(
    r"^(CheckpointManagerOptions\.read_only=True, setting|Given directory is read only|"
    r"Metadata file does not exist: .*_CHECKPOINT_METADATA|"
    r".*(_SignalingThread\.run\(\) raised an exception|Save Finalize thread \(save_finalize\) failed|"
    r"Failed to run \d+ Handler Commit operations))"
)


def accelerator_present() -> bool:
    """A GPU or TPU is attached (the checks of jax._src.hardware_utils, without importing JAX)."""
    if any(os.path.exists(node) for node in _GPU_NODES):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with contextlib.suppress(OSError):
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
    return False


class _OrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _BENIGN_ORBAX.match(record.getMessage())


ORBAX_NOISE = _OrbaxNoise()  # one object: adding it twice is a no-op


@contextlib.contextmanager
def _benign_stderr_dropped():
    """Descriptor 2 goes to a file for the block; afterwards its lines are replayed but the benign ones."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not _BENIGN_STDERR.search(line)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _load_jax() -> None:
    import jax  # noqa: F401
    from jax._src import xla_bridge

    # Plugin registration loads the CUDA plugin's libraries (one more stub line); it starts no backend.
    register = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
    if register is not None:
        register()


def _closed_loop_callback(kind, value, tb) -> bool:
    if kind is not RuntimeError or str(value) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(tb)
    return any(f.name == "call_soon_threadsafe" and "asyncio" in f.filename for f in frames)


def _excepthook(kind, value, tb, _previous=sys.excepthook):
    if not _closed_loop_callback(kind, value, tb):
        _previous(kind, value, tb)


def quiet_start(verb: str) -> None:
    logging.getLogger("absl").addFilter(ORBAX_NOISE)
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
    if accelerator_present():
        return
    if verb != "compile" and "JAX_PLATFORMS" not in os.environ:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" not in sys.modules:
        with _benign_stderr_dropped():
            _load_jax()
