"""Exports chat in transformers as is (DESIGN.md invariant 12), and a pretrained model's
tokenizer travels with it: a SentencePiece run and an `hf:` run (the model's own tokenizer,
no `data.tokenizer`) are exported, then `AutoTokenizer.apply_chat_template` gives the ids
jaxsft trained on and `generate` stops at the template's end-of-turn id."""

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxsft import config_load
from jaxsft.config import ConfigError
from jaxsft.data.formats import Message
from jaxsft.data.model_tokenizer import check_belongs
from jaxsft.data.templates import get_template
from jaxsft.infer import runs
from jaxsft.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "data"))
import official_fixtures as fx  # noqa: E402

transformers = pytest.importorskip("transformers")
RUN = [
    "data.synthetic_train_examples=200",
    "data.synthetic_eval_examples=16",
    "data.tokenizer_vocab_size=512",
    "data.max_length=64",
    "train.global_batch_size=8",
    "train.eval_batches=1",
    "train.steps=1",
    "logging.progress=false",
    "optim.warmup_steps=1",
]
CHAT = [Message("system", "Be brief."), Message("user", "What is 2 + 3?")]


def _tiny(vocab: int, out: Path, tokenizer_dir: Path | None = None, family: str = "Qwen2Config") -> Path:
    import torch

    # transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer whatever tokenizer.json says
    # (its byte-level pipeline); a SentencePiece run's export is a llama model type, read as is.
    config = getattr(transformers, family)(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if tokenizer_dir is not None:
            (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    return out


def _train(base: Path, run: Path, *extra: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        train(config_load.load(None, RUN + [f"train.run_dir={run}", f"model.init_from=hf:{base}", *extra]))
    return printed.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    base = tmp_path_factory.mktemp("export_chat")
    env = pytest.MonkeyPatch()
    env.setenv("JAXSFT_CACHE", str(base / "cache"))
    yield base
    env.undo()


@pytest.fixture(scope="module")
def qwen_dir(root):
    from jaxsft.data import synthetic

    texts = [m["content"] for r in synthetic.generate(400, 0, "train") for m in r["messages"]]
    texts += ["What is 2 + 3?", "Be brief.", "It is 5."] * 20 + [fx.template_source("qwen2.5")] * 3
    tokenizer = fx.family_dir(fx.train_base("byte", texts), "qwen2.5", root / "tok")
    return _tiny(1024, root / "qwen", tokenizer)


class StopAfter(transformers.LogitsProcessor if hasattr(transformers, "LogitsProcessor") else object):
    """Forces token `eot` as the 3rd new token: generation must stop there, not at max_new_tokens."""

    def __init__(self, prompt_length: int, eot: int):
        self.at, self.eot = prompt_length + 2, eot

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores[:] = -float("inf")
            scores[:, self.eot] = 0.0
        return scores


def _check_export(out: Path, tokenizer, template_name: str) -> None:
    import torch

    template = get_template(template_name, tokenizer)
    eot = template.end_of_turn_id(tokenizer) if template_name != "hf" else tokenizer.piece_id(template.eot)
    jinja = (out / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == jinja  # 4.5x layout
    generation = json.loads((out / "generation_config.json").read_text())
    stops = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert stops[0] == eot and tokenizer.eos_id in stops
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == generation["eos_token_id"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    dicts = [{"role": m.role, "content": m.content} for m in CHAT]
    ids = hf_tok.apply_chat_template(dicts, add_generation_prompt=True, tokenize=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    assert ids == template.render_prompt(CHAT, tokenizer).tolist()  # the ids the model was trained on
    model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert model.generation_config.eos_token_id == generation["eos_token_id"]
    with torch.no_grad():
        new = model.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=12,
            logits_processor=transformers.LogitsProcessorList([StopAfter(len(ids), eot)]),
        )
    assert new[0, len(ids) :].tolist()[-1] == eot and new.shape[1] == len(ids) + 3
    pipe = transformers.pipeline("text-generation", model=str(out))
    reply = pipe([dicts], max_new_tokens=3, do_sample=False)[0][0]["generated_text"]
    assert reply[-1]["role"] == "assistant"


@pytest.mark.slow
def test_sentencepiece_run_exports_a_model_that_chats_in_transformers(root):
    base = _tiny(
        512, root / "plain", family="LlamaConfig"
    )  # no tokenizer: the run trains a SentencePiece one, and says so
    printed = _train(base, root / "spm-run")
    assert "holds no tokenizer" in printed and "tokenizer: SentencePiece trained on the data" in printed
    out = root / "spm-export"
    runs.export_hf(root / "spm-run", out)
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer.json").is_file()
    _check_export(out, runs.load(root / "spm-run").tokenizer, "chatml")


@pytest.mark.slow
def test_hf_run_uses_the_models_own_tokenizer_and_template_and_exports_them(root, qwen_dir):
    printed = _train(qwen_dir, root / "hf-run", "data.template=hf")
    assert f"weights: hf:{qwen_dir}; tokenizer: hf:{qwen_dir} (" in printed and "with a chat template" in printed
    assert config_load.load(root / "hf-run" / "config.yaml").data.tokenizer == f"hf:{qwen_dir}"
    out = root / "hf-export"
    runs.export_hf(root / "hf-run", out)
    _check_export(out, runs.load(root / "hf-run").tokenizer, "hf")


def test_a_tokenizer_bigger_than_the_embedding_is_refused(root, qwen_dir):
    small = _tiny(512, root / "small", qwen_dir)
    with pytest.raises(ConfigError, match=r"has \d+ tokens, more than the model's embedding \(512, model.init_from"):
        _train(small, root / "refused", "data.template=hf")


def test_a_special_token_outside_the_embedding_is_refused():
    class Tok:
        vocab_size, bos_id, pad_id, eos_id, special_tokens = 100, None, 0, 130, {}

    cfg = config_load.load(None, ["model.init_from=hf:/m", "data.tokenizer=hf:/t"])
    with pytest.raises(ConfigError, match=r"special token eos has id 130, outside the model's embedding \(128"):
        check_belongs(Tok(), 128, cfg)
    check_belongs(Tok(), 131, cfg)
    assert np.isscalar(Tok.vocab_size)
