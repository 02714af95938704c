"""Eight fake CPU devices for every test, set before JAX starts.

The tests' programs are tiny, so their time is XLA's compile, most of it LLVM optimising
the generated CPU code: `--xla_backend_optimization_level=0` cuts a tiny train step's
compile about 2.5x (bench/NOTES.md, "Test suite"). It changes no HLO pass (buffer
assignment, so the compiled memory the tests assert on, is the same) and no float
semantics (no fast math either way); subprocesses the tests start inherit it.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
