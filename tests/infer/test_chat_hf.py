"""`jaxsft generate` / chat straight from a Hugging Face directory (weights + tokenizer.json +
chat template), against transformers' greedy generate on the same directory."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from jaxsft.cli import main  # noqa: E402
from jaxsft.data.tokenizer import load_tokenizer  # noqa: E402

import hf_fixtures  # noqa: E402  (the data tests' offline tokenizer directories)

NEW_TOKENS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import torch
    import transformers

    directory = hf_fixtures.hf_dir(tmp_path_factory.mktemp("hf_chat"), "chatml")
    vocab = load_tokenizer(f"hf:{directory}").vocab_size
    config = transformers.Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_generate_from_an_hf_directory_equals_transformers(model_dir, tmp_path):
    import torch
    import transformers

    (tmp_path / "in.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3"}]}
        )
        + "\n"
    )
    assert (
        main(
            [
                "generate",
                f"hf:{model_dir}",
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
    completion = json.loads((tmp_path / "out.jsonl").read_text())["completion"]

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=stops, pad_token_id=0
        )[0, len(ids) :].tolist()
    out = out[: next((i for i, t in enumerate(out) if t in stops), len(out))]
    assert completion == load_tokenizer(f"hf:{model_dir}").decode(out)
