"""LoRA/DoRA training: frozen base bit-identical, adapter-only optimizer state, sharding, exact resume, export."""

import contextlib
import dataclasses
import io
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import Config, ConfigError, DataConfig, MeshConfig, OptimConfig, PeftConfig, TrainConfig
from jaxsft.infer import runs
from jaxsft.model import hf
from jaxsft.train import program as program_lib
from jaxsft.train import sharding
from jaxsft.train import state as state_lib
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

from test_trainer import TINY, _records
from train_helpers import TINY_MODEL, VOCAB

LORA = PeftConfig(method="lora", rank=4, alpha=8.0, targets=("q", "v", "down"))


class LoraSetup:
    def __init__(
        self, model=TINY_MODEL, peft_cfg=LORA, devices=None, mesh_cfg=MeshConfig(), batch=(8, 32), compile=True
    ):
        model = dataclasses.replace(model, peft=peft_cfg)
        self.cfg = Config(
            model=model,
            mesh=mesh_cfg,
            optim=OptimConfig(learning_rate=1e-2, warmup_steps=0),
            data=DataConfig(max_length=batch[1]),
            train=TrainConfig(steps=10, global_batch_size=batch[0], seed=0),
        )
        self.mesh = sharding.make_mesh(mesh_cfg, devices)
        program = program_lib.build(self.cfg, VOCAB, self.mesh)
        self.plan, self.batch_sharding = program.plan, program.batch_sharding
        self.state, (self.base,) = state_lib.initial_state(self.cfg, VOCAB, program.optimizer, self.plan)
        if compile:
            self.step = program.compile_train()

    def run(self, batches):
        for batch in batches:
            self.state, _ = self.step(self.state, sharding.global_batch(batch, self.batch_sharding), self.base)


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def bf16_setup():
    """One device (per-device bytes == totals), base stored in bfloat16."""
    return LoraSetup(model=dataclasses.replace(TINY_MODEL, param_dtype="bfloat16"), devices=jax.devices()[:1])


def test_bf16_base_is_bit_identical_after_training_and_adapters_train(bf16_setup, batches):
    setup = bf16_setup
    base_before = jax.tree.map(np.asarray, setup.base)
    adapters_before = jax.tree.map(np.asarray, setup.state["params"])
    setup.run(batches)
    jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, setup.base))
    assert {x.dtype for x in jax.tree.leaves(setup.base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(setup.state["params"])} == {jnp.dtype(jnp.float32)}
    assert not np.any(adapters_before["blocks"]["attn"]["q_proj"]["b"])
    assert np.all(np.abs(np.asarray(setup.state["params"]["blocks"]["attn"]["q_proj"]["b"])) > 0)


def test_optimizer_state_and_compiled_arguments_hold_adapters_only(bf16_setup):
    setup = bf16_setup
    adapter_bytes = _bytes(setup.plan.abstract["params"])
    opt_bytes = _bytes(setup.plan.abstract["opt_state"])
    # AdamW: mu and nu per adapter param, plus scalar counters.
    assert 2 * adapter_bytes <= opt_bytes <= 2 * adapter_bytes + 64
    batch_bytes = 5 * 8 * 32 * 4
    expected = 3 * adapter_bytes + _bytes(setup.plan.frozen_abstract) + batch_bytes
    arguments = setup.step.memory_analysis().argument_size_in_bytes
    assert expected <= arguments <= expected + 64, (arguments, expected)


def test_adapters_shard_with_the_kernel_they_adapt():
    setup = LoraSetup(devices=jax.devices()[:4], mesh_cfg=MeshConfig(data=1, fsdp=4), compile=False)
    q = setup.state["params"]["blocks"]["attn"]["q_proj"]
    down = setup.state["params"]["blocks"]["mlp"]["down_proj"]
    # embed -> fsdp: A of q (input embed) and B of down (output embed) split over fsdp.
    assert q["a"].sharding.spec[1] == "fsdp" and q["a"].sharding.spec[2] is None
    assert down["b"].sharding.spec[2] == "fsdp" and down["a"].sharding.spec[1] is None
    assert setup.base["blocks"]["attn"]["q_proj"].sharding.spec[1] == "fsdp"


LORA_RUN = [
    "train.steps=6",
    "checkpoint.every=3",
    "train.eval_every=100",
    "mesh.fsdp=4",
    "mesh.data=2",
    "model.peft.method=lora",
    "model.peft.rank=4",
    "model.peft.targets=[q, v, gate]",
    "model.peft.dropout=0.1",
    "optim.learning_rate=0.01",
]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A 6-step LoRA run (adapter dropout 0.1) on 8 fake devices (fsdp=4 x data=2), and its stdout."""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = config_load.load(None, TINY + [f"train.run_dir={run}", *LORA_RUN])
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        train(cfg)
    return run, buffer.getvalue()


def test_lora_run_prints_counts_and_checkpoints_adapters_only(lora_run):
    run, printed = lora_run
    assert "trainable params: 1,664 || all params: " in printed
    saved = read_state(run, 6)
    assert set(saved) == {"step", "params", "opt_state"}
    assert set(saved["params"]["blocks"]) == {"attn", "mlp"}
    assert set(saved["params"]["blocks"]["attn"]) == {"q_proj", "v_proj"}
    assert set(saved["params"]["blocks"]["mlp"]["gate_proj"]) == {"a", "b"}


def test_lora_run_resumes_bitwise_under_fsdp(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run[0], run)
    straight = read_state(run, 6)
    losses = [r["loss"] for r in _records(run) if "loss" in r]
    shutil.rmtree(run / "checkpoints" / "6")
    (run / "metrics.jsonl").unlink()
    cfg = config_load.load(None, TINY + [f"train.run_dir={run}", *LORA_RUN])
    assert train(cfg).start_step == 3
    assert [r["loss"] for r in _records(run) if "loss" in r] == losses[3:]
    jax.tree.map(np.testing.assert_array_equal, straight, read_state(run, 6))


def test_export_peft_and_merged_hf_give_the_run_logits(lora_run, tmp_path):
    import torch
    import transformers
    from peft import PeftModel

    run = lora_run[0]
    loaded = runs.load(run)  # the base with the run's adapters merged in
    tokens = np.random.default_rng(0).integers(0, loaded.vocab_size, (2, 10)).astype(np.int32)
    positions = np.tile(np.arange(10, dtype=np.int32), (2, 1))
    ours = np.asarray(nnx.merge(loaded.graphdef, loaded.params)(tokens, positions, np.ones_like(tokens)))
    with pytest.raises(ConfigError, match="lora run: export it with --format peft"):
        runs.export_hf(run, tmp_path / "x")
    main(["export", str(run), str(tmp_path / "peft"), "--format", "peft"])
    main(["export", str(run), str(tmp_path / "merged"), "--format", "hf", "--merge"])
    cfg = config_load.load(run / "config.yaml")
    base = runs._peft_base(cfg, loaded.model_cfg, loaded.vocab_size)
    hf.save_pretrained(base, loaded.model_cfg, loaded.vocab_size, tmp_path / "base")

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=torch.as_tensor(tokens.astype(np.int64))).logits.numpy()

    auto = transformers.AutoModelForCausalLM.from_pretrained
    merged, base_logits = logits(auto(tmp_path / "merged")), logits(auto(tmp_path / "base"))
    peft_logits = logits(PeftModel.from_pretrained(auto(tmp_path / "base"), tmp_path / "peft"))
    assert np.abs(ours - base_logits).max() > 1e-4  # training moved the adapters
    np.testing.assert_allclose(merged, ours, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(peft_logits, ours, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_training_continues_from_an_exported_peft_adapter(lora_run, tmp_path):
    run = lora_run[0]
    main(["export", str(run), str(tmp_path / "peft"), "--format", "peft"])
    args = [a for a in LORA_RUN if not a.startswith("model.peft.targets")] + [
        "model.peft.targets=[q, v, gate_proj]",
        f"model.peft.init_from={tmp_path / 'peft'}",
        "train.steps=1",
    ]
    train(config_load.load(None, TINY + [f"train.run_dir={tmp_path / 'next'}", *args]))
    source_final = [r["eval_loss"] for r in _records(run) if "eval_loss" in r][-1]
    assert abs(_records(tmp_path / "next")[0]["eval_loss"] - source_final) < 1e-6


def _hf_base(path):
    """A tiny random Llama saved in Hugging Face format, shaped like the TINY runs (vocab 512)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return path


def _run_logits(run, tokens):
    loaded = runs.load(run)
    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
    return np.asarray(nnx.merge(loaded.graphdef, loaded.params)(tokens, positions, np.ones_like(tokens)))


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model.eval()(input_ids=torch.as_tensor(tokens.astype(np.int64))).logits.numpy()


HF_RUN = [a for a in TINY if not a.startswith("model.")] + [
    "train.steps=3",
    "train.eval_every=100",
    "checkpoint.every=3",
    "optim.learning_rate=0.01",
    "mesh.fsdp=2",
]


@pytest.mark.slow
def test_dora_run_on_a_hugging_face_base_exports_to_peft(tmp_path):
    import transformers
    from peft import PeftModel

    base = _hf_base(tmp_path / "base")
    run = tmp_path / "run"
    train(
        config_load.load(
            None,
            HF_RUN
            + [
                f"train.run_dir={run}",
                f"model.init_from=hf:{base}",
                "model.peft.method=dora",
                "model.peft.targets=[q, v, up]",
            ],
        )
    )
    main(["export", str(run), str(tmp_path / "peft"), "--format", "peft"])
    tokens = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)
    ours = _run_logits(run, tokens)
    auto = transformers.AutoModelForCausalLM.from_pretrained
    theirs = _torch_logits(PeftModel.from_pretrained(auto(base), tmp_path / "peft"), tokens)
    assert np.abs(ours - _torch_logits(auto(base), tokens)).max() > 1e-4  # training moved the adapters
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    assert set(read_state(run, 3)["params"]["blocks"]["attn"]["q_proj"]) == {"a", "b", "m"}


@pytest.mark.slow
def test_freeze_run_trains_its_selection_and_exports_merged(tmp_path):
    import transformers
    from safetensors.numpy import load_file

    base = _hf_base(tmp_path / "base")
    run = tmp_path / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        train(
            config_load.load(
                None,
                HF_RUN
                + [
                    f"train.run_dir={run}",
                    f"model.init_from=hf:{base}",
                    "model.peft.method=freeze",
                    "model.peft.trainable=[norm]",
                    "model.peft.top_layers=1",
                ],
            )
        )
    # norms: 2 x 2 x 32 in layer 0, the final 32; all of layer 1 (4 x 32 x 32 attention... counted by shapes).
    layer = 2 * 32 + 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64
    assert f"trainable params: {2 * 32 + layer + 32:,} ||" in printed.getvalue()
    with pytest.raises(ConfigError, match="freeze run: export it with --format hf --merge"):
        runs.export_hf(run, tmp_path / "x")
    main(["export", str(run), str(tmp_path / "merged"), "--format", "hf", "--merge"])
    tokens = np.random.default_rng(0).integers(0, 512, (2, 10)).astype(np.int32)
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(_torch_logits(merged, tokens), _run_logits(run, tokens), rtol=1e-4, atol=1e-4)
    before, after = (
        load_file(base / "model.safetensors"),
        load_file(tmp_path / "merged" / "model-00001-of-00001.safetensors"),
    )
    for name in before:
        trained = "norm" in name or "layers.1." in name
        assert np.array_equal(before[name], after[name]) != trained, name
