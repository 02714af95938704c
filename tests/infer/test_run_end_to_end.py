"""A tiny run that starts from Hugging Face weights, trains, exports, and generates.

init_from hf:/dir -> 3 training steps -> `jaxsft export` -> `from_pretrained` gives our
logits; `jaxsft generate` on the run gives what transformers' greedy generate gives on
the exported directory, text for text.
"""

import json

import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.cli import main
from jaxsft.data.formats import Message
from jaxsft.data.templates import get_template
from jaxsft.data.tokenizer import load_tokenizer
from jaxsft.infer import runs
from jaxsft.model.safetensors_io import TensorIndex
from jaxsft.train.trainer import train

TINY_RUN = [
    "data.synthetic_train_examples=400",
    "data.synthetic_eval_examples=32",
    "data.tokenizer_vocab_size=512",
    "data.max_length=64",
    "train.global_batch_size=8",
    "train.eval_batches=1",
    "train.steps=3",
    "logging.progress=false",
    "optim.warmup_steps=1",
    "optim.learning_rate=1e-3",
]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    import torch
    import transformers

    base = tmp_path_factory.mktemp("e2e")
    env = pytest.MonkeyPatch()
    env.setenv("JAXSFT_CACHE", str(base / "cache"))
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
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(base / "hf")
    cfg = config_load.load(None, TINY_RUN + [f"train.run_dir={base / 'run'}", f"model.init_from=hf:{base / 'hf'}"])
    train(cfg)
    yield base
    env.undo()


def test_training_started_from_the_hf_weights(run):
    start = TensorIndex(run / "hf").read("model.layers.1.mlp.up_proj.weight").T
    trained = runs.load(run / "run").params
    diff = np.abs(np.asarray(trained["blocks"]["mlp"]["up_proj"][1]) - start)
    assert 0 < diff.max() < 0.01  # three small steps away from the imported weights, not a fresh init


def test_export_of_the_fine_tuned_run_reloads_with_identical_logits(run):
    import torch
    import transformers

    out = run / "export"
    assert main(["export", str(run / "run"), str(out), "--format", "hf", "--max-shard-gb", "0.0001"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and (out / "tokenizer.model").is_file()
    loaded = runs.load(run / "run")
    tokens = np.random.default_rng(0).integers(0, 512, (2, 16)).astype(np.int32)
    positions = np.tile(np.arange(16, dtype=np.int32), (2, 1))
    ours = np.asarray(hf_forward(loaded, tokens, positions))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(ours - theirs).max() <= 1e-5


def hf_forward(loaded, tokens, positions):
    from flax import nnx

    return nnx.merge(loaded.graphdef, loaded.params)(tokens, positions, np.ones_like(tokens))


def test_generate_cli_equals_transformers_greedy_on_the_export(run, tmp_path):
    import torch
    import transformers

    prompts = [
        {"prompt": "What is 2 + 3?"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse abc"}]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    assert (
        main(
            [
                "generate",
                str(run / "run"),
                "--prompts",
                str(tmp_path / "in.jsonl"),
                "--out",
                str(tmp_path / "out.jsonl"),
                "--max-new-tokens",
                str(NEW_TOKENS),
            ]
        )
        == 0
    )
    got = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in g.items() if k != "completion"} for g in got] == prompts

    export = run / "export-generate"
    runs.export_hf(run / "run", export)
    tokenizer = load_tokenizer(str(run / "run" / "tokenizer.model"))
    template = get_template("chatml", tokenizer)
    stops = [template.end_of_turn_id(tokenizer), tokenizer.eos_id]
    model = transformers.AutoModelForCausalLM.from_pretrained(export).float().eval()
    conversations = [
        [Message("user", "What is 2 + 3?")],
        [Message("system", "Be brief."), Message("user", "Reverse abc")],
    ]
    for conversation, record in zip(conversations, got):
        ids = [int(i) for i in template.render_prompt(conversation, tokenizer)]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=stops, pad_token_id=0
            )[0, len(ids) :].tolist()
        expected = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
        assert record["completion"] == tokenizer.decode(expected)


def test_chat_keeps_the_history_and_the_system_prompt(run):
    from jaxsft.infer.chat import Session, chat
    from jaxsft.infer.sampler import Sampling

    inputs, outputs = iter(["hello", "", "and again", None]), []
    sampling = Sampling(max_new_tokens=NEW_TOKENS)
    chat(str(run / "run"), sampling, "You are terse.", lambda: next(inputs), outputs.append)
    assert len(outputs) == 2  # the empty line is skipped
    session = Session(str(run / "run"), sampling)
    history = [Message("system", "You are terse."), Message("user", "hello")]
    assert outputs[0] == session.reply([history])[0]
    history += [Message("assistant", outputs[0]), Message("user", "and again")]
    assert outputs[1] == session.reply([history])[0]
