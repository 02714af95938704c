"""A tiny trained run of the built-in tasks, shared by the eval/ tests (about 30 s on 2 cores)."""

import pytest

from jaxsft import config_load
from jaxsft.train.trainer import train

TINY_RUN = [
    "data.synthetic_train_examples=400",
    "data.synthetic_eval_examples=24",
    "data.tokenizer_vocab_size=512",
    "data.max_length=96",
    "train.global_batch_size=8",
    "train.eval_batches=100",
    "train.steps=40",
    "train.eval_every=20",
    "checkpoint.every=20",
    "checkpoint.keep=3",
    "checkpoint.async_save=false",
    "logging.progress=false",
    "optim.warmup_steps=2",
    "optim.learning_rate=1e-2",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.head_dim=8",
    "model.d_ff=64",
    "eval.max_new_tokens=12",
    "eval.batch_size=8",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The run directory; eval_batches covers the whole eval split, so the logged eval loss is over every record."""
    base = tmp_path_factory.mktemp("eval_run")
    env = pytest.MonkeyPatch()
    env.setenv("JAXSFT_CACHE", str(base / "cache"))
    train(config_load.load(None, TINY_RUN + [f"train.run_dir={base / 'run'}"]))
    yield base / "run"
    env.undo()
