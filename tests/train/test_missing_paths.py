"""A path the run reads that is not there: one line, exit 2, before any data is read."""

import pytest

from jaxsft.cli import main
from jaxsft.train import trainer


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.init_from=hf:{tmp}/no_model", "model.init_from=hf:{tmp}/no_model: {tmp}/no_model is not a directory"),
        ("model.init_from=orbax:{tmp}/no_model", "model.init_from=orbax:{tmp}/no_model: {tmp}/no_model is not a"),
        ("data.tokenizer={tmp}/no.model", "data.tokenizer={tmp}/no.model: no such file"),
        ("data.tokenizer=hf:{tmp}/no_dir", "data.tokenizer=hf:{tmp}/no_dir: {tmp}/no_dir is not a directory"),
        ("data.train_files=[{tmp}/no.jsonl]", "data file {tmp}/no.jsonl does not exist"),
        ("data.sources=[{{path: {tmp}/a*.jsonl}}]", "data file pattern '{tmp}/a*.jsonl' matches no file"),
    ],
)
def test_a_missing_path_is_one_line_before_any_data_is_read(tmp_path, capsys, monkeypatch, override, expected):
    monkeypatch.setattr(trainer, "build_data", lambda *a, **k: pytest.fail("the data was read"))
    run = tmp_path / "run"
    assert main(["train", "--set", f"train.run_dir={run}", "--set", override.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and expected.format(tmp=tmp_path) in err
