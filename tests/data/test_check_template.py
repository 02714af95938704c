"""`jaxsft data check-template DIR` on official templates (tests/data/templates) with
tokenizers built here, saved as a model directory would hold them."""

import json

import numpy as np
import pytest

from jaxsft.cli import main
from jaxsft.data import check_template as ct
from jaxsft.data.formats import parse_record
from jaxsft.data.templates import get_template
from jaxsft.data.tokenizer import load_tokenizer

import official_fixtures as fx

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    texts = [m["content"] for r in ct.BATTERY.values() for m in r["messages"]] * 20
    root = tmp_path_factory.mktemp("check")
    out = {}
    for family in ("qwen3", "mistral-v0.2"):
        base = fx.train_base(fx.FAMILIES[family][1], texts + [fx.template_source(family)] * 3)
        directory = fx.family_dir(base, family, root)
        # The transformers 5 layout: the template in chat_template.jinja, not in the config.
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "chat_template.jinja").write_text(config.pop("chat_template"))
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
        out[family] = directory
    return out


def test_qwen3_passes_every_case(dirs, capsys):
    assert main(["data", "check-template", str(dirs["qwen3"])]) == 0
    out = capsys.readouterr().out
    for name in ct.BATTERY:
        assert f"  ok    {name}: ids equal, mask sane" in out
    assert "7 of 7 cases fine" in out and "reasoning written as field" in out


def test_a_refusal_with_a_reason_is_fine(dirs, capsys):
    assert main(["data", "check-template", f"hf:{dirs['mistral-v0.2']}"]) == 0
    out = capsys.readouterr().out
    assert "  ok    tool call: refused (template rejected the conversation: " in out
    assert "roles must alternate" in out and "  ok    single-turn: ids equal, mask sane" in out


def test_without_transformers_the_ids_are_not_checked(dirs, capsys, monkeypatch):
    monkeypatch.setattr(ct, "_reference_tokenizer", lambda d, t: (None, "transformers is not installed"))
    assert main(["data", "check-template", str(dirs["qwen3"])]) == 0
    assert "  ok    unicode: ids not checked (transformers is not installed), mask sane" in capsys.readouterr().out


def test_a_bad_case_fails_the_check(dirs, capsys, monkeypatch):
    monkeypatch.setattr(ct, "mask_problem", lambda *a: "WRONG: stand-in")
    assert main(["data", "check-template", str(dirs["qwen3"])]) == 1
    out = capsys.readouterr().out
    assert "  FAIL  single-turn: ids equal, mask WRONG: stand-in" in out and "0 of 7 cases fine" in out


def test_mask_problem_catches_a_trained_prompt(dirs):
    tok = load_tokenizer(f"hf:{dirs['qwen3']}")
    template = get_template("hf", tok)
    conversation = parse_record(ct.BATTERY["multi-turn"])
    ids, weights = template.render(conversation, tok)
    assert ct.mask_problem(tok, template, conversation, ids, weights) == "sane"
    assert ct.mask_problem(tok, template, conversation, ids, np.ones_like(weights)).startswith("WRONG: 1 trained")
    first = np.flatnonzero(weights)[0]
    early = weights.copy()
    early[first - 8 : first] = 1  # the mask starts inside the user turn
    assert "holds prompt text 'apple'" in ct.mask_problem(tok, template, conversation, ids, early)
    late = weights.copy()
    late[np.flatnonzero(weights)[-1]] = 0  # the end-of-turn token untrained
    assert "does not end with an end-of-turn token" in ct.mask_problem(tok, template, conversation, ids, late)


def test_a_directory_without_tokenizer_json_gets_one_line(tmp_path, capsys):
    assert main(["data", "check-template", str(tmp_path)]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
