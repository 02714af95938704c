"""A quiet start on a CPU host: benign library noise is dropped, everything else kept; --version."""

import logging
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from jaxsft import quiet
from jaxsft.cli import main

pytestmark = pytest.mark.skipif(quiet.accelerator_present(), reason="the quiet start only acts without accelerators")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"jaxsft {version('jaxsft')}"


def test_jax_starts_on_the_cpu_without_runtime_noise():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    script = (
        "from jaxsft import quiet; quiet.quiet_start('train'); import jax, sys; "
        "print(jax.devices()[0].platform); print('kept', file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "cpu" and done.stderr == "kept\n"


def test_platforms_are_left_to_the_user(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,cuda")
    quiet.quiet_start("train")
    assert os.environ["JAX_PLATFORMS"] == "cpu,cuda"


TINY = ["--set", "model.vocab_size=256", "--set", "model.d_model=32", "--set", "model.n_layers=1"]
TINY += ["--set", "model.n_heads=2", "--set", "model.n_kv_heads=2", "--set", "model.head_dim=16"]
TINY += ["--set", "model.d_ff=64", "--set", "data.max_length=64", "--set", "train.global_batch_size=8"]


@pytest.mark.parametrize("target", [["--gpu", "h100x1"], ["--topology", "v5e-4"]], ids=["gpu", "tpu"])
def test_pre_flight_compiles_for_its_target_and_says_nothing_else(target):
    """On a CPU host the pre-flight's devices come from the plugins' topologies: JAX itself
    starts on the CPU (the CUDA plugin, started as a backend, failed to register and `--gpu`
    had no compiler), and neither runtime's probe for hardware reaches stderr."""
    if target[0] == "--topology":
        pytest.importorskip("libtpu", reason="pip install -e '.[tpu]'")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_SKIP_CUDA_CONSTRAINTS_CHECK")}
    done = subprocess.run(
        [sys.executable, "-m", "jaxsft.cli", "compile", *target, *TINY],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert "total" in done.stdout and "(fits)" in done.stdout


def test_captured_stderr_keeps_every_line_but_the_benign_ones(capfd):
    with quiet.benign_stderr_dropped():
        os.write(
            2,
            b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            b"I0000 00:00:1.0  1 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
            b"not be used.\nE0000 something a user must see\n",
        )
    assert capfd.readouterr().err == "E0000 something a user must see\n"


def test_orbax_read_only_notes_are_dropped_and_other_warnings_kept(caplog):
    logging.getLogger("absl").addFilter(quiet.ORBAX_NOISE)
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING, logger="absl"):
        absl.warning("Metadata file does not exist: /run/checkpoints/6/state/_CHECKPOINT_METADATA")
        absl.warning("CheckpointManagerOptions.read_only=True, setting create=False.")
        absl.warning("Given directory is read only=/run/checkpoints")
        absl.warning("Something else about /run/checkpoints")
    assert [r.getMessage() for r in caplog.records] == ["Something else about /run/checkpoints"]


CLOSED_LOOP = [  # as PyErr_Display writes it, piece by piece
    "Traceback (most recent call last):\n",
    '  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in call_soon_threadsafe\n',
    "    self._check_closed()\n",
    "RuntimeError",
    ": ",
    "Event loop is closed",
    "\n",
]
OTHER_ERROR = ["Traceback (most recent call last):\n", '  File "a.py", line 1, in f\n', "ValueError: boom\n"]


def test_closed_loop_tracebacks_of_foreign_threads_are_dropped_and_everything_else_kept():
    import _thread
    import io
    import threading

    out = io.StringIO()
    stderr = quiet.ClosedLoopStderr(out)
    done = threading.Event()

    def foreign():  # a thread Python did not start, as TensorStore's are
        for chunk in [*CLOSED_LOOP, "a plain line\n", *OTHER_ERROR, *CLOSED_LOOP, "a partial line"]:
            stderr.write(chunk)
        done.set()

    _thread.start_new_thread(foreign, ())
    assert done.wait(10)
    stderr.write("".join(CLOSED_LOOP))  # Python's own threads always pass straight through
    assert out.getvalue() == "a plain line\n" + "".join(OTHER_ERROR) + "a partial line" + "".join(CLOSED_LOOP)


def test_only_orbax_tasks_never_retrieved_are_dropped_from_asyncio_logs():
    def record(message):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    orbax = "Task exception was never retrieved\nfuture: <Task coro=<f() defined at /x/orbax/checkpoint/_src/a.py:1>>"
    other = "Task exception was never retrieved\nfuture: <Task coro=<f() defined at /x/mine.py:1>>"
    assert not quiet.ORBAX_ORPHAN_TASK.filter(record(orbax))
    assert quiet.ORBAX_ORPHAN_TASK.filter(record(other)) and quiet.ORBAX_ORPHAN_TASK.filter(record("other"))


def test_an_attention_kernel_that_cannot_run_here_is_one_line():
    """`model.attention=cudnn` traced on a CPU host (a GPU pre-flight, or a train run) was a
    traceback; it is a config error like any other: one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run(
        [sys.executable, "-m", "jaxsft.cli", "compile", "--gpu", "h100x1", *TINY, "--set", "model.attention=cudnn"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr == (
        "jaxsft: error: model.attention=cudnn does not support platform cpu (it needs a GPU); use model.attention=xla\n"
    )
