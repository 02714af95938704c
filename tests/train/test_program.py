"""One builder of the compiled train program: `jaxsft compile` reports the program `jaxsft train` runs."""

import jax
import pytest

from jaxsft import config_load
from jaxsft.train import aot
from jaxsft.train import program as program_lib
from jaxsft.train.trainer import train

from test_trainer import TINY


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.slow
def test_compile_and_train_lower_the_same_program_with_micro_batches_and_peft(tmp_path, monkeypatch):
    lowered = []
    original = program_lib.Program.lower_train

    def recording(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        lowered.append(result.as_text())
        return result

    monkeypatch.setattr(program_lib.Program, "lower_train", recording)
    cfg = config_load.load(
        None,
        TINY
        + [
            f"train.run_dir={tmp_path / 'run'}",
            "train.steps=1",
            "train.eval_every=100",
            "train.global_batch_size=16",
            "train.micro_batches=2",
            "mesh.data=2",
            "mesh.fsdp=-1",
            "model.vocab_size=512",
            "model.peft.method=lora",
            "model.peft.rank=4",
            "model.peft.targets=[q,v,down]",
        ],
    )
    train(cfg)
    report = aot.compile_for(cfg, jax.devices(), aot.Chip(1, 2**34, 1e12), len(jax.devices()))
    assert len(lowered) == 2
    assert "sharding_constraint" in lowered[0]  # the micro-batch split keeps the rows' sharding
    assert lowered[0] == lowered[1]
    assert report.params_bytes > 0 and report.optimizer_bytes > 0


def test_pre_flight_knows_the_vocabulary_without_data():
    demo = config_load.load(None)
    assert program_lib.vocab_size_without_data(demo) == demo.data.tokenizer_vocab_size
    sized = config_load.load(None, ["model.vocab_size=1000"])
    assert program_lib.vocab_size_without_data(sized) == 1000
