"""The quality suite: every recipe parses, the table reads its runs, and a smoke run of all."""

import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import pytest

from jaxsft import config_load
from jaxsft.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quality)


def test_every_recipe_parses_and_differs_from_full_in_one_way():
    configs = {p.stem: config_load.load(p) for p in (ROOT / "configs" / "quality").glob("*.yaml")}
    assert set(configs) == {"base", *quality.RECIPES}
    full = configs["sft-full"]
    assert configs["sft-lora"].model.peft.method == "lora" and full.model.peft.method == "none"
    assert configs["sft-prompt"].model.peft.method == "prompt_tuning"
    assert configs["sft-adapter"].model.peft.method == "adapter"
    for name in ("sft-lora", "sft-prompt", "sft-adapter"):  # only the method and its learning rate differ
        c = configs[name]
        assert (
            dataclasses.replace(
                c, model=dataclasses.replace(c.model, peft=full.model.peft), optim=full.optim, train=full.train
            )
            == full
        ), name
    assert configs["sft-no-reasoning"].data.reasoning == "drop" and full.data.reasoning == "train"
    assert configs["sft-2-phrasings"].data.sources[0].phrasings == 2 and full.data.sources[0].phrasings == 0
    assert configs["sft-replay"].data.sources[1].weight > 0 == full.data.sources[1].weight
    assert configs["sft-drift"].optim.drift_penalty > 0 == full.optim.drift_penalty
    assert dataclasses.replace(configs["sft-drift"], optim=full.optim, train=full.train) == full


def test_bad_synthetic_task_set_is_named():
    with pytest.raises(ConfigError, match=r"data.sources\[0\].path='nope'.*demo, quality, quality_text"):
        config_load.from_dict({"data": {"sources": [{"type": "synthetic", "path": "nope"}]}})


def test_table_and_doc_markers(tmp_path):
    rows = [
        {
            "name": "base",
            "seen_phrasing": 0.0,
            "unseen_phrasing": 0.0,
            "unseen_task": 0.0,
            "text_loss": 2.0,
            "seconds": 10,
        },
        {
            "name": "sft-full",
            "seen_phrasing": 0.5,
            "unseen_phrasing": 0.25,
            "unseen_task": 0.0,
            "text_loss": 2.5,
            "seconds": None,
        },
    ]
    text = quality.table(rows)
    assert "| sft-full | 50.0% | 25.0% | 0.0% | 2.500 | +0.500 | - |" in text
    doc = tmp_path / "q.md"
    doc.write_text(f"intro\n{quality.BEGIN}\nold\n{quality.END}\nend\n")
    quality.write_doc(doc, text)
    assert doc.read_text() == f"intro\n{quality.BEGIN}\n{text}\n{quality.END}\nend\n"
    with pytest.raises(SystemExit, match="markers"):
        quality.write_doc(_no_markers(tmp_path), text)


def _no_markers(tmp_path):
    path = tmp_path / "plain.md"
    path.write_text("no table here\n")
    return path


@pytest.mark.slow
def test_smoke_run_of_every_recipe_is_resumable(tmp_path):
    args = [
        sys.executable,
        str(ROOT / "bench" / "quality.py"),
        "--out",
        str(tmp_path),
        "--steps",
        "2",
        "--examples",
        "64",
        "--eval-examples",
        "20",
    ]
    first = subprocess.run(args, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| base", *(f"| {r}" for r in quality.RECIPES)]
    assert all(math.isfinite(float(line.split(" | ")[4])) for line in lines[2:])
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done, skipped") == 1 + len(quality.RECIPES)
