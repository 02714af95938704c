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
from pathlib import Path

import pytest

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

# pytest-xdist (`-n auto` in pyproject.toml's addopts, `--dist loadgroup`): every module runs
# whole on one worker, so its module fixtures are built once; the directories whose conftest
# builds session fixtures (trained runs, tokenizers) run whole on one worker, so those are too.
_SESSION_FIXTURE_DIRS = ("data", "eval", "synth")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    root = Path(__file__).parent
    for item in items:
        rel = Path(item.path).relative_to(root)
        group = rel.parts[0] if rel.parts[0] in _SESSION_FIXTURE_DIRS else rel.as_posix()
        item.add_marker(pytest.mark.xdist_group(group))
