"""Presets: parameter counts equal the published figures, from shapes only; `model info`."""

import dataclasses

import pytest

from jaxsft.cli import main
from jaxsft.config import ConfigError, ModelConfig
from jaxsft.model import hf_config
from jaxsft.model.families import PRESETS, resolve
from jaxsft.model.info import param_groups

# Published totals (model cards / safetensors metadata of the Hugging Face releases).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-8b": 8_190_735_360,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma-2-2b": 2_614_341_888,
    "gemma-2-9b": 9_241_705_984,
}


def test_every_preset_has_a_published_count():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_param_count_equals_the_published_figure(name):
    cfg = PRESETS[name]
    assert sum(param_groups(cfg, cfg.vocab_size).values()) == PUBLISHED[name]


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen3-8b", "gemma-2-2b"])
def test_exported_config_builds_the_same_size_in_transformers(name):
    """Our config.json for the preset, built by transformers on the meta device: same count."""
    import torch
    import transformers

    cfg = PRESETS[name]
    hf = hf_config.to_hf(cfg, cfg.vocab_size, "float32")
    config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_preset_fills_only_fields_left_at_their_default():
    cfg = resolve(ModelConfig(preset="qwen2.5-0.5b", n_layers=2, dtype="bfloat16"))
    assert (cfg.family, cfg.d_model, cfg.n_layers, cfg.dtype, cfg.vocab_size) == ("qwen2", 896, 2, "bfloat16", 151936)
    assert dataclasses.replace(cfg, n_layers=24, dtype="float32", preset="") == PRESETS["qwen2.5-0.5b"]
    with pytest.raises(ConfigError, match="model.preset='llama-9'"):
        resolve(ModelConfig(preset="llama-9"))


def test_model_info_prints_groups_and_total(capsys):
    assert main(["model", "info", "llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows["total"] == "8,030,261,248"
    assert rows["embedding"] == rows["lm_head"] == "525,336,576"
    assert rows["attention"] == f"{32 * 4096 * 128 * (32 + 8 + 8 + 32):,}"
    assert main(["model", "info", "no-such-model"]) == 2


def test_family_recipes_parse():
    from pathlib import Path

    from jaxsft import config_load

    recipes = [p for p in (Path(__file__).resolve().parents[2] / "configs").glob("*-*.yaml")]
    assert len(recipes) >= 3
    for path in recipes:
        cfg = config_load.load(path)
        assert cfg.model.init_from.startswith("hf:"), path


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.family=gpt2", "model.family: expected one of llama, mistral, qwen2, qwen3, gemma, gemma2, got 'gpt2'"),
        ("model.rope_scaling.type=yarn", "model.rope_scaling.type: expected one of none, llama3, got 'yarn'"),
        ("model.init_from=/models/x", "model.init_from='/models/x': expected hf:/path/to/model_dir or orbax:/path"),
        ("model.sliding_window=-1", "model.sliding_window=-1: expected 0 (off) or a positive number"),
    ],
)
def test_model_config_errors_are_one_line(override, message):
    from jaxsft import config_load

    with pytest.raises(ConfigError) as e:
        config_load.load(None, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
