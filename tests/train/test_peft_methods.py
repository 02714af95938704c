"""Bottleneck adapters, prefix and prompt tuning in training: the frozen base bit-identical,
optimizer state for the trained part only, packed rows equal the examples alone (losses and
gradients), sharded == one device, init text, and the one-line refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import ConfigError, MeshConfig, PeftConfig
from jaxsft.model import peft
from jaxsft.train import program as program_lib
from jaxsft.train import state as state_lib
from jaxsft.train.step import loss_sums

from test_lora_training import LoraSetup
from train_helpers import TINY_MODEL, VOCAB, make_batch

SLOW = pytest.mark.slow  # the plain suite keeps one case of each property; `-m slow` runs the rest
METHODS = {
    "adapter": PeftConfig(method="adapter", adapter_size=8),
    "pfeiffer": PeftConfig(method="adapter", adapter_size=8, adapter_placement="pfeiffer", adapter_activation="silu"),
    "prefix": PeftConfig(method="prefix_tuning", num_virtual_tokens=4),
    "projected": PeftConfig(method="prefix_tuning", num_virtual_tokens=4, prefix_projection=True, prefix_hidden=16),
    "prompt": PeftConfig(method="prompt_tuning", num_virtual_tokens=4),
}


def _np(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=SLOW) for n in ("adapter", "pfeiffer", "projected")] + ["prefix", "prompt"],
)
def test_base_stays_bit_identical_and_only_the_trained_part_moves(name, batches):
    setup = LoraSetup(peft_cfg=METHODS[name], devices=jax.devices()[:1])
    base_before, trained_before = _np(setup.base), _np(setup.state["params"])
    setup.run(batches)
    jax.tree.map(np.testing.assert_array_equal, base_before, _np(setup.base))
    after = _np(setup.state["params"])
    # Every trained leaf moved (a bottleneck's zero `up` too: its gradient is not zero).
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trained_before), jax.tree.leaves(after)))
    n_trained = sum(x.size for x in jax.tree.leaves(after))
    assert n_trained == peft.count(setup.cfg.model, VOCAB)[0]
    assert sum(x.size for x in jax.tree.leaves(setup.state["opt_state"]) if x.ndim) == 2 * n_trained  # AdamW


def _unpacked(batch: dict) -> dict:
    """Each segment of each packed row alone in a row of its own (positions already restart)."""
    rows = []
    for r in range(batch["inputs"].shape[0]):
        for seg in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
            keep = batch["segment_ids"][r] == seg
            rows.append({k: v[r][keep] for k, v in batch.items()})
    width = batch["inputs"].shape[1]
    out = {k: np.zeros((len(rows), width), v.dtype) for k, v in batch.items()}
    for i, row in enumerate(rows):
        for k, v in row.items():
            out[k][i, : len(v)] = v
    out["segment_ids"] = (out["segment_ids"] > 0).astype(np.int32)
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW) for n in ("adapter", "prefix", "projected")] + ["prompt"])
def test_a_packed_batch_gives_the_losses_and_gradients_of_its_examples_alone(name):
    cfg = METHODS[name]
    setup = LoraSetup(peft_cfg=cfg, devices=jax.devices()[:1], compile=False)
    trainable = jax.tree.map(lambda x: x + 0.1, setup.state["params"])  # a non-zero bottleneck `up`
    packed = make_batch(np.random.default_rng(0), rows=2, length=32, examples_per_row=3)
    fn = jax.jit(jax.value_and_grad(lambda t, b: loss_sums(setup.plan.graphdef, t, b, setup.base, cfg), has_aux=True))
    (loss, weight), grads = fn(trainable, {k: jnp.asarray(v) for k, v in packed.items()})
    (loss_1, weight_1), grads_1 = fn(trainable, {k: jnp.asarray(v) for k, v in _unpacked(packed).items()})
    assert float(weight) == float(weight_1) > 0
    np.testing.assert_allclose(float(loss), float(loss_1), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, grads_1)


@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW) for n in ("adapter", "prefix", "prompt")])
def test_sharded_training_equals_one_device(name, batches):
    cfg = METHODS[name]
    one = LoraSetup(peft_cfg=cfg, devices=jax.devices()[:1])
    many = LoraSetup(peft_cfg=cfg, mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2))
    one.run(batches)
    many.run(batches)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), _np(one.state), _np(many.state))
    params = many.state["params"]
    if name == "prefix":  # keys/values split over kv heads like the base's k/v kernels
        assert params["prefix"]["k"].sharding.spec[2] == "tensor"
    if name == "adapter":  # model width split like the weights that read the residual stream
        assert params["blocks"]["mlp"]["adapter"]["down"].sharding.spec[1] == "fsdp"


def test_prompt_init_text_sets_the_virtual_tokens_to_its_embeddings():
    setup = LoraSetup(peft_cfg=METHODS["prompt"], devices=jax.devices()[:1], compile=False)
    text = dataclasses.replace(METHODS["prompt"], prompt_init_text="hello")
    cfg = dataclasses.replace(setup.cfg, model=dataclasses.replace(setup.cfg.model, peft=text))
    optimizer = program_lib.build(cfg, VOCAB, setup.mesh).optimizer
    state, (base,) = state_lib.initial_state(cfg, VOCAB, optimizer, setup.plan, prompt_ids=[5, 9, 2])
    rows = np.asarray(base["embedding"])[[5, 9, 2, 5]]  # the ids repeated to 4 virtual tokens
    np.testing.assert_array_equal(np.asarray(state["params"]["prompt"]), rows)
    with pytest.raises(ConfigError, match="prompt_init_text: the text encodes to no token ids"):
        state_lib.initial_state(cfg, VOCAB, optimizer, setup.plan)


def test_bitfit_on_a_family_without_biases_is_refused_in_one_line(tmp_path, capsys):
    bitfit = dataclasses.replace(TINY_MODEL, peft=PeftConfig(method="freeze", trainable=("_bias$",)))
    with pytest.raises(ConfigError, match="this model has no biases") as info:
        peft.check(bitfit)
    assert "\n" not in str(info.value) and "nothing would train" in str(info.value)
    peft.check(dataclasses.replace(bitfit, family="qwen2"))  # qwen2 has q/k/v biases: fine
    # `jaxsft train` stops there, before any data is read or anything written.
    args = ["train", "--set", f"train.run_dir={tmp_path / 'run'}", "--set", "model.peft.method=freeze"]
    assert main([*args, "--set", "model.peft.trainable=[_bias$]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no biases" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_bad_combinations_are_refused_at_config_time():
    for overrides, words in (
        (["model.peft.method=prefix_tuning", "model.attention=cudnn"], "the cudnn kernel cannot take a prefix"),
        (["model.peft.method=prompt_tuning", "model.attention=pallas_gpu"], "the pallas_gpu kernel"),
        (["model.peft.method=freeze", "model.peft.top_layers=1", "model.peft.init_from=/x"], "init_from: only for"),
    ):
        with pytest.raises(ConfigError, match=words) as info:
            config_load.load(None, overrides)
        assert "\n" not in str(info.value)
