"""`jaxsft data preview` with official Hugging Face templates: each turn's trained tokens."""

import json

import pytest
import yaml

from jaxsft.cli import main

import official_fixtures as fx

RECORD = {
    "messages": [
        {"role": "user", "content": "Sort: pear apple"},
        {"role": "assistant", "content": "apple pear", "reasoning": "alphabetical"},
        {"role": "user", "content": "Reverse: a b c"},
        {"role": "assistant", "content": "c b a", "reasoning": "backwards"},
    ]
}


def _config(tmp_path, family: str) -> str:
    texts = [m["content"] for m in RECORD["messages"]] * 20 + [fx.template_source(family)] * 3
    directory = fx.family_dir(fx.train_base(fx.FAMILIES[family][1], texts), family, tmp_path)
    (tmp_path / "chats.jsonl").write_text("\n".join(json.dumps(RECORD) for _ in range(8)) + "\n")
    cfg = {
        "data": {
            "max_length": 128,
            "template": "hf",
            "tokenizer": f"hf:{directory}",
            "sources": [{"path": str(tmp_path / "chats.jsonl")}],
        },
        "train": {"global_batch_size": 4},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "c.yaml")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_preview_lists_each_turns_trained_tokens_for_qwen3(tmp_path, capsys):
    assert main(["data", "preview", _config(tmp_path, "qwen3"), "--n", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    # Qwen3 renders earlier turns without their reasoning: trained as the template renders them.
    assert "  messages[1] assistant: trained 'apple pear<|im_end|>'\n" in out
    assert "  messages[3] assistant: trained '<think>\\nbackwards\\n</think>\\n\\nc b a<|im_end|>'" in out
    assert "messages[0]" not in out and "messages[2]" not in out


def test_preview_lists_each_turns_trained_tokens_for_llama3(tmp_path, capsys):
    assert main(["data", "preview", _config(tmp_path, "llama3.1"), "--n", "1", "--plain"]) == 0
    out = capsys.readouterr().out
    assert "  messages[1] assistant: trained 'apple pear<|eot_id|>'\n" in out
    assert "  messages[3] assistant: trained 'c b a<|eot_id|>'" in out
    assert "[[apple pear<|eot_id|>]]" in out
