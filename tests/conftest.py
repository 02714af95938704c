"""Eight fake CPU devices for every test, set before JAX starts.

The tests' programs are tiny, so their time is XLA's compile, most of it LLVM optimising
the generated CPU code: `--xla_backend_optimization_level=0` cuts a tiny train step's
compile about 2.5x (bench/NOTES.md, "Test suite"). It changes no HLO pass (buffer
assignment, so the compiled memory the tests assert on, is the same) and no float
semantics (no fast math either way); subprocesses the tests start inherit it.

Many tests compile the same small programs (the tiny trainer config, the same Hugging
Face shapes), so a persistent compilation cache shared by the session and the
subprocesses it starts turns the repeats into reads (a tiny step: ~8 s -> ~0.6 s). It
lives in a fresh temporary directory per session, so nothing carries between sessions.
"""

import atexit
import os
import shutil
import tempfile

import suite_scheduling

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxsft-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# pytest-xdist (`-n auto --dist loadscope` in pyproject.toml's addopts): one scope per module, or
# per directory whose conftest builds session fixtures, so each fixture is built once
# (tests/suite_scheduling.py says how and why).
def pytest_xdist_make_scheduler(config, log):
    return suite_scheduling.make_scheduler(config, log)
