"""Bottleneck-adapter, prefix- and prompt-tuning runs end to end on 8 fake devices: trainable
counts printed, checkpoints hold the trained part only, exports load where they are used
(HF PEFT for prefixes and prompts, `model.peft.init_from` for adapters), `jaxsft generate`
equals greedy decoding of the reference, and a merge is refused in one line."""

import contextlib
import io
import json

import jax
import numpy as np
import pytest
from flax import nnx

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.config import ConfigError
from jaxsft.data.formats import Message
from jaxsft.infer import runs
from jaxsft.infer.chat import Session
from jaxsft.infer.sampler import Sampling
from jaxsft.model import hf
from jaxsft.train.checkpoint import read_state
from jaxsft.train.trainer import train

from test_trainer import TINY, _records

W = 4
BASE = 51_360  # TINY's params: 2 x 512 x 32 (embedding, head) + 2 x 9,280 per layer + 32 (final norm)
RUNS = {
    # Houlsby, size 16: 2 layers x 2 branches x (32 x 16 + 16 + 16 x 32 + 32).
    "adapter": (["model.peft.method=adapter", "model.peft.adapter_size=16"], 2 * 2 * 1072),
    # Projection over the 16-wide (K x H) prefix: 4 x 16 + (16 x 16 + 16) + (16 x 64 + 64).
    "prefix": (
        ["model.peft.method=prefix_tuning", f"model.peft.num_virtual_tokens={W}", "model.peft.prefix_projection=true"],
        W * 16 + 272 + 1088,
    ),
    # 4 virtual input embeddings of width 32, starting as the text's tokens.
    "prompt": (
        [
            "model.peft.method=prompt_tuning",
            f"model.peft.num_virtual_tokens={W}",
            "model.peft.prompt_init_text=Answer briefly",
            "eval.generate_n=4",  # the generation eval during training, on the base + prompt
        ],
        W * 32,
    ),
}
COMMON = ["train.steps=4", "checkpoint.every=2", "train.eval_every=2", "optim.learning_rate=0.01"]
MESH = ["mesh.data=2", "mesh.fsdp=4"]


# The prefix run is in the plain suite; the adapter and prompt runs (tens of seconds each) in `-m slow`.
@pytest.fixture(
    scope="module",
    params=[pytest.param("adapter", marks=pytest.mark.slow), "prefix", pytest.param("prompt", marks=pytest.mark.slow)],
)
def method_run(request, tmp_path_factory):
    """A 4-step run of the method on fsdp 4 x data 2, and what it printed."""
    run = tmp_path_factory.mktemp(request.param) / "run"
    cfg = config_load.load(None, TINY + [f"train.run_dir={run}", *COMMON, *MESH, *RUNS[request.param][0]])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        train(cfg)
    return request.param, run, printed.getvalue()


def test_counts_are_printed_and_checkpoints_hold_the_trained_part_only(method_run):
    name, run, printed = method_run
    trainable = RUNS[name][1]
    assert f"trainable params: {trainable:,} || all params: {BASE + trainable:,} ||" in printed
    saved = read_state(run, 4)["params"]
    expected = {
        "adapter": {"blocks"},
        "prefix": {"prefix"},
        "prompt": {"prompt"},
    }[name]
    assert set(saved) == expected
    assert sum(np.asarray(x).size for x in jax.tree.leaves(saved)) == trainable


def _logits(loaded, tokens):
    positions = np.tile(np.arange(tokens.shape[1], dtype=np.int32), (tokens.shape[0], 1))
    return np.asarray(nnx.merge(loaded.graphdef, loaded.params)(tokens, positions, np.ones_like(tokens)))


def _torch_logits(model, tokens):
    import torch

    with torch.no_grad():
        mask = torch.ones(tokens.shape, dtype=torch.long)
        out = model.eval()(input_ids=torch.as_tensor(tokens.astype(np.int64)), attention_mask=mask).logits.numpy()
    return out[:, -tokens.shape[1] :]  # PEFT's prompt tuning also returns the virtual tokens' logits


def test_a_merge_is_refused_in_one_line(method_run, tmp_path):
    name, run, _ = method_run
    fmt = "adapter" if name == "adapter" else "peft"
    with pytest.raises(ConfigError, match=f"cannot be merged into the base's weights; export it with --format {fmt}"):
        runs.export_hf(run, tmp_path / "x", merge=True)
    wrong = "peft" if name == "adapter" else "adapter"
    assert main(["export", str(run), str(tmp_path / "y"), "--format", wrong]) == 2


def test_generation_eval_during_training_equals_jaxsft_eval_of_the_checkpoint(method_run):
    from jaxsft.eval.evaluate import score

    name, run, _ = method_run
    if name != "prompt":
        pytest.skip("the prompt run has the generation eval on")
    in_memory = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    last = [s for s in in_memory if s["step"] == 4]
    assert len(last) == 4
    _, reloaded = score(str(run))
    by_where = {s["where"]: s["output"] for s in reloaded}
    assert [s["output"] for s in last] == [by_where[s["where"]] for s in last]


def _greedy_by_forward(logits_fn, prompt: list[int], new: int, stops) -> list[int]:
    seq = list(prompt)
    for _ in range(new):
        token = int(np.argmax(logits_fn(np.asarray([seq], np.int32))[0, -1]))
        if token in stops:
            break
        seq.append(token)
    return seq[len(prompt) :]


def test_export_loads_where_it_is_used_and_generate_equals_its_greedy_decoding(method_run, tmp_path):
    import transformers
    from peft import PeftModel

    name, run, _ = method_run
    loaded = runs.load(run)  # the base and the run's trained part, beside it
    tokens = np.random.default_rng(0).integers(0, loaded.vocab_size, (2, 10)).astype(np.int32)
    ours = _logits(loaded, tokens)
    cfg = config_load.load(run / "config.yaml")
    base = runs._peft_base(cfg, loaded.model_cfg, loaded.vocab_size)
    hf.save_pretrained(base, loaded.model_cfg, loaded.vocab_size, tmp_path / "base")
    auto = transformers.AutoModelForCausalLM.from_pretrained
    base_logits = _torch_logits(auto(tmp_path / "base"), tokens)
    assert np.abs(ours - base_logits).max() > 1e-4  # the trained part matters
    if name == "adapter":
        # Our own format: it loads back through model.peft.init_from and training continues from it.
        assert main(["export", str(run), str(tmp_path / "out"), "--format", "adapter"]) == 0
        args = [*COMMON, *MESH, *RUNS[name][0], f"model.peft.init_from={tmp_path / 'out'}", "train.steps=1"]
        train(config_load.load(None, TINY + [f"train.run_dir={tmp_path / 'next'}", *args]))
        final = [r["eval_loss"] for r in _records(run) if "eval_loss" in r][-1]
        assert abs(_records(tmp_path / "next")[0]["eval_loss"] - final) < 1e-6
        reference = lambda t: _logits(loaded, t)  # noqa: E731
    else:
        assert main(["export", str(run), str(tmp_path / "out"), "--format", "peft"]) == 0
        peft_model = PeftModel.from_pretrained(auto(tmp_path / "base"), tmp_path / "out")
        np.testing.assert_allclose(_torch_logits(peft_model, tokens), ours, rtol=1e-4, atol=1e-4)
        reference = lambda t: _torch_logits(peft_model, t)  # noqa: E731
    # `jaxsft generate` (KV cache) == greedy decoding by full forwards of the reference.
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "What is 2 + 3?"}) + "\n")
    out = tmp_path / "o.jsonl"
    args = ["generate", str(run), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out), "--max-new-tokens", "6"]
    assert main(args) == 0
    session = Session(str(run), Sampling(max_new_tokens=6))
    prompt = list(session.template.render_prompt([Message("user", "What is 2 + 3?")], loaded.tokenizer))
    expected = _greedy_by_forward(reference, prompt, 6, set(session.stop_ids))
    assert json.loads(out.read_text())["completion"] == loaded.tokenizer.decode(expected)
