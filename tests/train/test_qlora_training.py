"""QLoRA training (model.peft.quantize): the quantised base stays bit-identical, adapters train,
sharding changes nothing but rounding, checkpoints and exports hold what they should."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import MeshConfig, PeftConfig
from jaxsft.infer import runs
from jaxsft.model import hf, quant
from jaxsft.model.transformer import abstract_params
from jaxsft.train import sharding
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

from test_lora_training import HF_RUN, LoraSetup, _hf_base, _run_logits, _torch_logits
from train_helpers import TINY_MODEL, VOCAB

# TINY_MODEL's axes (d 32, MLP 64, head dim 8) all take blocks of 8.
NF4 = PeftConfig(
    method="lora", rank=4, alpha=8.0, targets=("all-linear",), quantize="nf4", quant_block_size=8, double_quant=True
)


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _train(setup, batches, repeats=1):
    losses = []
    for batch in batches * repeats:
        setup.state, metrics = setup.step(setup.state, sharding.global_batch(batch, setup.batch_sharding), setup.base)
        losses.append(float(metrics["loss"]))
    return losses


def test_quantised_base_is_bit_identical_after_training_and_adapters_train(batches):
    setup = LoraSetup(peft_cfg=NF4, devices=jax.devices()[:1])
    q_proj = setup.base["blocks"]["attn"]["q_proj"]
    assert set(q_proj) == {"codes", "scale_codes", "scale_step", "scale_offset"}
    assert q_proj["codes"].dtype == jnp.uint8 and q_proj["codes"].shape == (2, 16, 4, 8)  # [L, d/2, n, h]
    assert setup.base["embedding"].dtype == jnp.float32
    base_before = jax.tree.map(np.asarray, setup.base)
    losses = _train(setup, batches[:1], repeats=6)
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, setup.base))
    assert losses[-1] < losses[0] - 0.01, losses
    assert {x.dtype for x in jax.tree.leaves(setup.state["params"])} == {jnp.dtype(jnp.float32)}
    assert np.all(np.abs(np.asarray(setup.state["params"]["blocks"]["mlp"]["down_proj"]["b"])) > 0)


@pytest.mark.slow
def test_compiled_arguments_hold_adapters_moments_and_the_quantised_base():
    """int8 is a quarter of the float32 kernels and NF4 an eighth (+ scales); the step's
    arguments are exactly adapters x 3 (params, two moments) + the quantised base + the batch."""
    sizes = {}
    for method in ("none", "int8", "nf4"):
        pe = dataclasses.replace(NF4, quantize=method, double_quant=False)
        sizes[method] = _nbytes(
            jax.eval_shape(lambda p: quant.quantize_base(p, pe), abstract_params(TINY_MODEL, VOCAB))
        )
    kernels = 2 * (2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64)  # q, o; k, v; gate, up, down
    assert sizes["none"] - sizes["int8"] == kernels * 4 - kernels - kernels // 8 * 4
    assert sizes["none"] - sizes["nf4"] == kernels * 4 - kernels // 2 - kernels // 8 * 4
    setup = LoraSetup(peft_cfg=dataclasses.replace(NF4, double_quant=False), devices=jax.devices()[:1])
    assert _nbytes(setup.plan.frozen_abstract) == sizes["nf4"]
    adapters = _nbytes(setup.plan.abstract["params"])
    expected = 3 * adapters + sizes["nf4"] + 5 * 8 * 32 * 4
    arguments = setup.step.memory_analysis().argument_size_in_bytes
    assert expected <= arguments <= expected + 64, (arguments, expected)


@pytest.mark.slow  # tens of seconds (pre-flight compiles, trainer runs): `pytest -m slow`
def test_sharded_qlora_equals_one_device(batches):
    int8 = dataclasses.replace(NF4, quantize="int8", double_quant=False)
    one = LoraSetup(peft_cfg=int8, devices=jax.devices()[:1])
    mesh = LoraSetup(peft_cfg=int8, mesh_cfg=MeshConfig(data=2, fsdp=2, tensor=2))
    codes = mesh.base["blocks"]["attn"]["q_proj"]["codes"]
    assert codes.sharding.spec[1] == "fsdp" and codes.sharding.spec[2] == "tensor"  # [L, embed, heads, head_dim]
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(one.base["blocks"]["attn"]["q_proj"]["codes"]))
    np.testing.assert_allclose(_train(mesh, batches), _train(one, batches), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-5, atol=5e-5),
        mesh.state["params"],
        one.state["params"],
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.peft.quantize=nf4"], "model.peft.quantize=nf4: a quantised frozen base (QLoRA) needs"),
        (["model.peft.method=freeze", "model.peft.top_layers=1", "model.peft.quantize=int8"], "not freeze"),
        (["model.peft.method=lora", "model.peft.quantize=nf4", "model.peft.quant_block_size=7"], "even size"),
        (["model.peft.method=lora", "model.peft.double_quant=true"], "double_quant: needs"),
    ],
)
def test_bad_qlora_settings_are_one_line_at_config_time(overrides, message, capsys):
    assert main(["config", "show", *[a for kv in overrides for a in ("--set", kv)]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


@pytest.mark.slow
def test_qlora_run_on_a_hugging_face_base_checkpoints_adapters_and_exports(tmp_path):
    """A 3-step NF4 QLoRA run: checkpoints hold the adapters only; `--format peft` on the
    dequantised base and `--format hf --merge` both give the run's logits; generation runs."""
    import transformers
    from peft import PeftModel

    base = _hf_base(tmp_path / "base")
    run = tmp_path / "run"
    args = ["model.peft.method=lora", "model.peft.targets=[all-linear]", "model.peft.quantize=nf4"]
    args += ["model.peft.quant_block_size=8", f"model.init_from=hf:{base}"]
    train(config_load.load(None, HF_RUN + [f"train.run_dir={run}", *args]))
    saved = read_state(run, 3)
    assert set(saved["params"]["blocks"]["attn"]["o_proj"]) == {"a", "b"}
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(saved["params"]))

    tokens = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)
    ours = _run_logits(run, tokens)
    main(["export", str(run), str(tmp_path / "peft"), "--format", "peft"])
    main(["export", str(run), str(tmp_path / "merged"), "--format", "hf", "--merge"])
    cfg = config_load.load(run / "config.yaml")
    loaded = runs.load(run)
    frozen = runs._peft_base(cfg, loaded.model_cfg, loaded.vocab_size)
    assert quant.quantized(frozen["blocks"]["mlp"]["up_proj"])
    dequantized = tmp_path / "dequantized"
    hf.save_pretrained(quant.dequantize_base(frozen), loaded.model_cfg, loaded.vocab_size, dequantized)
    auto = transformers.AutoModelForCausalLM.from_pretrained
    np.testing.assert_allclose(_torch_logits(auto(tmp_path / "merged"), tokens), ours, rtol=1e-4, atol=1e-4)
    peft_logits = _torch_logits(PeftModel.from_pretrained(auto(dequantized), tmp_path / "peft"), tokens)
    np.testing.assert_allclose(peft_logits, ours, rtol=1e-4, atol=1e-4)
    # The unquantised base differs by the quantisation error, which the adapters do not undo.
    assert np.abs(_torch_logits(PeftModel.from_pretrained(auto(base), tmp_path / "peft"), tokens) - ours).max() > 1e-3

    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n")
    outs = []
    for source, out in ((run, "run.jsonl"), (f"hf:{tmp_path / 'merged'}", "merged.jsonl")):
        generate = ["generate", str(source), "--prompts", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / out)]
        assert main([*generate, "--max-new-tokens", "6"]) == 0
        outs.append(json.loads((tmp_path / out).read_text())["completion"])
    assert outs[0] == outs[1]
