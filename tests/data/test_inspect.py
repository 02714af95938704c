"""`jaxsft data preview|stats`, and a Hugging Face tokenizer + template end to end."""

import json

import numpy as np
import pytest
import yaml

from jaxsft.cli import main
from jaxsft.config import DataConfig, SourceConfig
from jaxsft.data.inspect import expected_epochs, highlight
from jaxsft.data.pipeline import build_data

import hf_fixtures


def _config(tmp_path, **data) -> str:
    rows = [
        {"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
        for i in range(40)
    ]
    lines = [json.dumps(r) for r in rows]
    (tmp_path / "chats.jsonl").write_text("\n".join(lines[:1] + ["{broken"] + lines[1:]) + "\n")
    cfg = {
        "data": {
            "max_length": 32,
            "max_dropped_fraction": 0.05,
            "sources": [{"path": str(tmp_path / "chats.jsonl"), "eval_fraction": 0.1}],
            **data,
        },
        "train": {"steps": 10, "global_batch_size": 4},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("JAXSFT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_preview_marks_trained_tokens(tmp_path, capsys):
    assert main(["data", "preview", _config(tmp_path), "--n", "2", "--plain"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith(f"--- chats.jsonl {tmp_path / 'chats.jsonl'}:3: ") and "2 trained" in out[1]
    assert "\n".join(out[2:6]) == "<|im_start|>user\nSay 1<|im_end|>\n<|im_start|>assistant\n[[1<|im_end|>]]"


def test_stats_counts_sources_packing_and_lengths(tmp_path, capsys):
    assert main(["data", "stats", _config(tmp_path, packing="best_fit")]) == 0
    out = capsys.readouterr().out
    assert "chats.jsonl: 36 records, 35 good, dropped 1 (invalid JSON: 1)" in out
    assert "from step 0: sampled examples chats.jsonl 100.0%" in out and "eval: 5 records, 5 examples" in out
    efficiency = float(out.split("packing efficiency ")[1].split("%")[0])
    assert 50 < efficiency <= 100 and "example length (tokens):" in out
    assert f"{tmp_path / 'chats.jsonl'}:2: invalid JSON" in out


def test_expected_epochs_follow_the_stages():
    class Fake:
        pools = [np.arange(100), np.arange(10)]

        @staticmethod
        def stage_probabilities():
            return [(0, np.array([1.0, 0.0])), (5, np.array([0.5, 0.5]))]

    assert expected_epochs(Fake, steps=10, examples_per_step=20) == [(100 + 50) / 100, 50 / 10]


def test_hf_tokenizer_and_template_end_to_end(hf_base, tmp_path):
    directory = hf_fixtures.hf_dir(hf_base, "llama3")
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"n{i}"}) + "\n" for i in range(30)))
    cfg = DataConfig(
        tokenizer=f"hf:{directory}",
        template="hf",
        max_length=48,
        sources=(SourceConfig(path=str(path), format="alpaca"),),
    )
    data = build_data(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert data.report.examples == 30
    it = iter(data.train_dataset(2, seed=0))
    batch = next(it)
    it.close()
    tok, eot = data.tokenizer, data.template.end_of_turn_id(data.tokenizer)
    trained = batch["targets"][0][batch["loss_weights"][0] > 0]
    assert trained[-1] == eot and tok.decode(trained[:2]).startswith("n")
    assert highlight(tok, np.array([tok.bos_id, *tok.encode("hi")]), np.array([0.0, 0.0, 1.0]), False).startswith(
        "<|begin_of_text|>"
    )
    saved = data.tokenizer.save(tmp_path / "run")
    assert sorted(p.name for p in saved.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
