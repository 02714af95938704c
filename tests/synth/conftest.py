"""A tiny trained run of the built-in tasks for the synth tests: the eval tests' recipe, fewer steps."""

import importlib.util
from pathlib import Path

import pytest

from jaxsft import config_load
from jaxsft.train.trainer import train

_spec = importlib.util.spec_from_file_location("eval_conftest", Path(__file__).parent.parent / "eval" / "conftest.py")
_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eval)
SYNTH_RUN = [a for a in _eval.TINY_RUN if not a.startswith(("train.steps", "train.eval_every"))] + [
    "train.steps=20",
    "train.eval_every=20",
    "eval.generate_n=0",
]


@pytest.fixture(scope="session")
def synth_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("synth_run")
    env = pytest.MonkeyPatch()
    env.setenv("JAXSFT_CACHE", str(base / "cache"))
    train(config_load.load(None, SYNTH_RUN + [f"train.run_dir={base / 'run'}"]))
    yield base / "run"
    env.undo()
