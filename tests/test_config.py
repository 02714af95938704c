"""The config tree: YAML + overrides, typed errors that name the key, the saved file."""

from pathlib import Path

import pytest

from jaxsft import config as config_lib
from jaxsft import config_load
from jaxsft.cli import DEMO_CONFIG, main


def test_demo_config_loads_and_round_trips(tmp_path):
    cfg = config_load.load(DEMO_CONFIG)
    assert cfg.train.steps == 760 and cfg.model.d_model == 128 and cfg.model.family == "qwen3"
    config_load.save(cfg, tmp_path / "config.yaml")
    assert config_load.load(tmp_path / "config.yaml") == cfg


def test_overrides_are_typed():
    cfg = config_load.load(
        DEMO_CONFIG,
        [
            "train.steps=50",
            "optim.learning_rate=3e-4",
            "mesh.rules.batch=[data]",
            "data.train_files=[a.jsonl, b.jsonl]",
            "model.vocab_size=1024",
        ],
    )
    assert cfg.train.steps == 50 and cfg.optim.learning_rate == 3e-4
    assert cfg.mesh.rules.batch == ("data",) and cfg.data.train_files == ("a.jsonl", "b.jsonl")
    assert cfg.model.vocab_size == 1024
    assert isinstance(config_load.load(None, ["optim.learning_rate=1"]).optim.learning_rate, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key train.stepz; did you mean train.steps?"),
        ("trian.steps=3", "unknown config key trian; did you mean train?"),
        ("train.steps=abc", "train.steps: expected int, got 'abc' (str)"),
        ("train.steps=true", "train.steps: expected int, got True (bool)"),
        ("model.tie_embeddings=1", "model.tie_embeddings: expected true or false, got 1"),
        ("data.packing=tight", "data.packing: expected one of first_fit, best_fit, concat, none, got 'tight'"),
        ("mesh.rules.embed=[fsdq]", "mesh.rules.embed: unknown mesh axis 'fsdq'"),
        ("model.n_kv_heads=3", "model.n_heads=4 must be a positive multiple of model.n_kv_heads=3"),
        ("train.steps", "expected KEY=VALUE"),
        (
            "model.peft.method=adapters",
            "model.peft.method: expected one of none, lora, dora, freeze, adapter, prefix_tuning, prompt_tuning, "
            "got 'adapters'",
        ),
        ("model.peft.dropout=1.0", "model.peft.dropout=1.0: expected a value in [0, 1)"),
        ("model.peft.method=freeze", "method freeze needs model.peft.trainable patterns or model.peft.top_layers > 0"),
        ("lora.rank=8", "unknown config key lora"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(config_lib.ConfigError) as info:
        config_load.load(DEMO_CONFIG, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rat: 0.1\n")
    with pytest.raises(
        config_lib.ConfigError, match="unknown config key optim.learning_rat; did you mean optim.learning_rate"
    ):
        config_load.load(path)


def test_cli_prints_one_line_and_exits_2(capsys):
    assert main(["config", "show", str(DEMO_CONFIG), "--set", "train.setps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.setps" in err and "train.steps" in err


def test_cli_config_show_shows_every_default(capsys):
    assert main(["config", "show", "--set", "train.steps=7"]) == 0
    shown = capsys.readouterr().out
    assert "steps: 7" in shown and "rope_theta: 10000.0" in shown and "clip_norm: 1.0" in shown


def test_strategy_presets_set_the_rules_and_round_trip(tmp_path):
    cfg = config_load.load(None, ["mesh.strategy=tp"])
    assert cfg.mesh.rules == config_lib.STRATEGIES["tp"] and cfg.mesh.rules.embed == ()
    config_load.save(cfg, tmp_path / "run.yaml")
    assert config_load.load(tmp_path / "run.yaml") == cfg
    with pytest.raises(config_lib.ConfigError, match="mesh.strategy=tp and mesh.rules disagree"):
        config_load.load(None, ["mesh.strategy=tp", "mesh.rules.embed=[fsdp]"])


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))
def test_shipped_configs_validate_and_round_trip(name, tmp_path):
    cfg = config_load.load(Path(__file__).parent.parent / "configs" / name)
    config_load.save(cfg, tmp_path / "config.yaml")
    assert config_load.load(tmp_path / "config.yaml") == cfg


def test_a_preset_or_checkpoint_on_the_command_line_replaces_the_files_shape(tmp_path):
    """`jaxsft compile --set model.preset=llama-3.1-8b` loads the demo config underneath: its
    2-layer, d_ff 256 qwen3 shape must give way to the preset (it used to win, giving a 0.6 B
    "8B"); the file's other settings and the command line's own shape fields still apply."""
    from jaxsft.model.families import resolve
    from jaxsft.model.transformer import param_count

    cfg = config_load.load(DEMO_CONFIG, ["model.preset=llama-3.1-8b", "model.vocab_size=128256"])
    model = resolve(cfg.model)
    assert (model.family, model.d_model, model.n_layers, model.d_ff, model.n_kv_heads) == ("llama", 4096, 32, 14336, 8)
    assert param_count(model, 128256) == 8_030_261_248  # Llama-3.1-8B's published count
    assert cfg.train.steps == config_load.load(DEMO_CONFIG).train.steps  # the rest of the file stays

    own = tmp_path / "own.yaml"
    own.write_text("model:\n  d_model: 64\n  n_layers: 2\n  dtype: bfloat16\n  remat: full\n")
    cfg = config_load.load(own, ["model.preset=llama-3.2-1b", "model.n_layers=6"])
    model = resolve(cfg.model)
    assert (model.d_model, model.n_layers, model.dtype, model.remat) == (2048, 6, "bfloat16", "full")
    # A checkpoint decides the shape too: the file's shape fields would conflict with its config.json.
    cfg = config_load.load(own, ["model.init_from=hf:/ckpt"])
    assert cfg.model.d_model == config_lib.ModelConfig().d_model and cfg.model.dtype == "bfloat16"
    # The same preset in the file and on the command line changes nothing.
    own.write_text("model:\n  preset: llama-3.2-1b\n  n_layers: 2\n")
    assert resolve(config_load.load(own, ["model.preset=llama-3.2-1b"]).model).n_layers == 2


def test_an_override_to_the_default_cannot_undo_a_presets_value_and_says_so():
    """A preset fills the fields left at their defaults, so `tie_embeddings=false` (the default)
    on a tied preset would be silently ignored: it is refused in one line instead."""
    with pytest.raises(config_lib.ConfigError, match=r"model.tie_embeddings=False is the default.*True"):
        config_load.load(None, ["model.preset=llama-3.2-1b", "model.tie_embeddings=false"])
    # The same value as the preset's, or a saved config that writes every field, is fine.
    config_load.load(None, ["model.preset=llama-3.2-1b", "model.tie_embeddings=true"])
    config_load.load(None, ["model.preset=llama-3.1-8b", "model.tie_embeddings=false"])
