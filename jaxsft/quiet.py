"""A quiet start on a host without accelerators: only what a user must see reaches stderr.

The CLI calls `quiet_start(verb)` before anything imports JAX. Three sources of benign
noise on a CPU host, each silenced at its source and only there:

- The TPU and CUDA runtimes (the `tpu` and `gpu-aot` extras) probe for hardware when JAX
  starts its backends: libtpu's "could not determine TPU accelerator type / worker
  hostnames" and the CUDA plugin's "Unable to load CUDA" traceback. With no accelerator
  on the machine (JAX's own checks: NVIDIA and AMD device nodes, Google's PCI vendor id)
  and `JAX_PLATFORMS` unset, `JAX_PLATFORMS=cpu` is set, so those backends are never
  started; any `JAX_PLATFORMS` the user set is left alone. `jaxsft compile` too: its
  compile-only TPU and CUDA devices come from the plugins' topology descriptions, not
  from a started backend, and the CUDA plugin is told before it registers that this is
  compile-only work (without that it failed to register and `--gpu` had no compiler).
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
  TensorStore's own threads print the same traceback without the hook (PyErr_Display);
  `ClosedLoopStderr` drops exactly those blocks, and only from threads Python did not start.
  Orbax's failed write tasks are also logged by asyncio at exit ("Task exception was never
  retrieved"); a filter on the asyncio logger drops exactly those of Orbax's coroutines.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import sys
import tempfile
import threading
import traceback
from pathlib import Path

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_NODES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
# Lines of a C++ library's log that are benign when no accelerator is present.
_BENIGN_STDERR = re.compile(
    r"cudart_stub\.cc:\d+\] Could not find cuda drivers|"
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called|"
    r"^Failed to find host bounds for accelerator type: WARNING: could not determine TPU accelerator type"
)
_BENIGN_ORBAX = re.compile(
    r"^(CheckpointManagerOptions\.read_only=True, setting|Given directory is read only|"
    r"Metadata file does not exist: .*_CHECKPOINT_METADATA|"
    r".*(_SignalingThread\.run\(\) raised an exception|Save Finalize thread \(save_finalize\) failed|"
    r"Failed to run \d+ Handler Commit operations))"
)


def accelerator_present() -> bool:
    """A GPU or TPU is attached (the checks of jax._src.hardware_utils, without importing JAX)."""
    return any(os.path.exists(node) for node in _GPU_NODES) or tpu_present()


def tpu_present() -> bool:
    """A TPU is attached: a PCI device of Google's vendor id."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with contextlib.suppress(OSError):
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
    return False


class _OrbaxNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _BENIGN_ORBAX.match(record.getMessage())


ORBAX_NOISE = _OrbaxNoise()  # one object: adding it twice is a no-op


class _OrbaxOrphanTask(logging.Filter):
    """asyncio's "Task exception was never retrieved" for an Orbax write task: the failed
    checkpoint write that jaxsft already reported in one line (checkpoint.py, exit code 6)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and "orbax/checkpoint" in message)


ORBAX_ORPHAN_TASK = _OrbaxOrphanTask()


@contextlib.contextmanager
def benign_stderr_dropped():
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


class ClosedLoopStderr:
    """sys.stderr, less the "Event loop is closed" tracebacks printed by threads Python did not
    start (see the module docstring). Their writes are held line by line; a traceback block is
    dropped when it raised in `call_soon_threadsafe` and ended in that error, else written
    whole. Every other write passes straight through."""

    CLOSED = "RuntimeError: Event loop is closed"

    def __init__(self, stream):
        self.stream = stream
        self._held: dict[int, str] = {}  # per foreign thread: its text not yet written
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def write(self, text: str) -> int:
        if not isinstance(threading.current_thread(), threading._DummyThread):
            return self.stream.write(text)
        with self._lock:
            key = threading.get_ident()
            held = self._held.get(key, "") + text
            self._held[key] = self._release(held)
        return len(text)

    def _release(self, held: str) -> str:
        """Writes what is decided; returns what must wait for more text."""
        header = "Traceback (most recent call last):"
        while held:
            if held.startswith(header):
                lines = held.split("\n")  # the last item is an unfinished line ("" after a newline)
                end = next((i for i in range(1, len(lines) - 1) if lines[i] and not lines[i].startswith(" ")), None)
                if end is None:
                    return held  # the block's exception line has not come yet
                block = "\n".join(lines[: end + 1]) + "\n"
                if not (lines[end] == self.CLOSED and "in call_soon_threadsafe" in block):
                    self.stream.write(block)
                held = "\n".join(lines[end + 1 :])
                continue
            newline = held.find("\n")
            if newline < 0:
                if header.startswith(held):
                    return held  # may still become a traceback's first line
                self.stream.write(held)
                return ""
            self.stream.write(held[: newline + 1])
            held = held[newline + 1 :]
        return held

    def flush(self) -> None:
        self.stream.flush()


def quiet_start(verb: str) -> None:
    logging.getLogger("absl").addFilter(ORBAX_NOISE)
    logging.getLogger("asyncio").addFilter(ORBAX_ORPHAN_TASK)
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
    if not isinstance(sys.stderr, ClosedLoopStderr):
        sys.stderr = ClosedLoopStderr(sys.stderr)
    if accelerator_present():
        return
    if "JAX_PLATFORMS" not in os.environ:
        os.environ["JAX_PLATFORMS"] = "cpu"
    if verb == "compile":  # compile-only CUDA devices; set before the plugin registers
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    if "jax" not in sys.modules:
        with benign_stderr_dropped():
            _load_jax()
