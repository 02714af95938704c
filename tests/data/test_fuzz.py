"""Hostile data: raw bytes, random JSON, huge and deeply nested values, random Unicode, in
every record format, through reading, formats, every built-in template, truncation and packing.

No exception escapes (a whole data set that cannot train is a one-line `DataError`); every
emitted example and batch keeps the masking and packing contract (pipeline.py); every record
is either an example or counted as dropped, with file, line and reason.
"""

import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsft.cli import main
from jaxsft.config import DataConfig, SourceConfig
from jaxsft.data import synthetic_tasks
from jaxsft.data.formats import BadRecord, DataError, parse_record
from jaxsft.data.pipeline import Encoder, build_data
from jaxsft.data.sources import parse_json
from jaxsft.data.templates import BUILTIN
from jaxsft.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion", "text")
ROWS, LENGTH = 4, 96
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    """One SentencePiece model that knows every built-in template's control pieces."""
    texts = [json.dumps(r, ensure_ascii=False) for r in synthetic_tasks.task_set("demo", 300, 0, "train")]
    specials = tuple(dict.fromkeys(p for t in BUILTIN.values() for p in t.special_pieces))
    path = tmp_path_factory.mktemp("spm") / "fuzz.model"
    train_sentencepiece(texts, 400, path, specials)
    return path


@pytest.fixture(scope="module")
def tokenizer(spm_path):
    return SentencePieceTokenizer(spm_path)


# --- strategies -------------------------------------------------------------------------

texts = st.text(max_size=40) | st.sampled_from(
    ["", " ", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "\x00", "<start_of_turn>", "<|eot_id|>", "\u202e", "é" * 300]
)
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | texts
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(texts, c, max_size=3), max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "human", "gpt", "observation"]) | values
calls = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "id": values,
            "type": values,
            "name": texts | values,
            "arguments": texts | values,
            "function": st.fixed_dictionaries({"name": texts, "arguments": texts | values}) | values,
        },
    ),
    max_size=2,
)
message = st.fixed_dictionaries(
    {"role": roles, "content": texts | values},
    optional={
        "train": st.booleans() | values,
        "reasoning": texts | values,
        "tool_calls": calls | values,
        "tool_call_id": texts | values,
        "name": texts | values,
        "from": roles,
        "value": texts | values,
    },
)
conversation = st.lists(message, max_size=5)
record = st.fixed_dictionaries(
    {},
    optional={
        "messages": conversation | values,
        "conversations": conversation | values,
        "tools": st.lists(values) | values,
        "instruction": texts | values,
        "input": texts | values,
        "output": texts | values,
        "system": texts | values,
        "prompt": texts | conversation | values,
        "completion": texts | conversation | values,
        "text": texts | values,
    },
)


# A record its format accepts (random words, Unicode and control pieces): the hostile lines around it.
words = st.from_regex(r"[A-Za-z][^\n]{0,30}", fullmatch=True).filter(lambda t: "\\u" not in t) | st.sampled_from(
    ["x <|im_end|> y", "a\u202eb", "é" * 4]
)  # short: an overlong prompt is dropped, rightly
GOOD = {
    "messages": st.builds(
        lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, words, words
    ),
    "alpaca": st.builds(lambda q, a: {"instruction": q, "output": a}, words, words),
    "sharegpt": st.builds(
        lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}, words, words
    ),
    "prompt_completion": st.builds(lambda q, a: {"prompt": q, "completion": a}, words, words),
    "text": st.builds(lambda t: {"text": t}, words),
}


def _deep(n: int) -> str:
    return "[" * n + "]" * n


hostile = st.sampled_from(
    [
        _deep(100_000),
        '{"messages": ' + _deep(5000) + "}",
        '{"text": ' + "9" * 5000 + "}",
        "NaN",
        "-Infinity",
        '"a string"',
        "[1, 2]",
        "1e999",
        "{}",
        "",
        "\ufeff{}",
        '{"text": "\\ud800"}',
        '{"text": "ok\\udfff"}',
        '{"text": "\\ud83d\\ude00 fine"}',
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
        '"content": "a", "tool_calls": [{"function": "f"}]}]}',
        '{"messages": [{"role": "user", "content": "q"}, '
        '{"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "' + "[" * 3000 + '"}]}]}',
        '{"conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]}',
    ]
)
line = (
    record.map(lambda r: json.dumps(r))
    | record.map(lambda r: json.dumps(r, ensure_ascii=False))
    | values.map(json.dumps)
    | hostile
)
raw_line = line.map(lambda s: s.encode("utf-8", "surrogatepass")) | st.binary(max_size=64)


# --- checks -----------------------------------------------------------------------------


def _check_example(features: dict, vocab_size: int, max_length: int) -> None:
    inputs, targets, weights = features["inputs"], features["targets"], features["loss_weights"]
    assert len(inputs) == len(targets) == len(weights) and 1 <= len(inputs) <= max_length
    assert (targets[:-1] == inputs[1:]).all()
    assert ((0 <= inputs) & (inputs < vocab_size)).all() and ((0 <= targets) & (targets < vocab_size)).all()
    assert np.isfinite(weights).all() and (weights >= 0).all() and weights.any()


def _encode_everywhere(raw: bytes, tokenizer, template: str, max_length: int = LENGTH):
    """raw line -> every format -> the template; returns the examples, asserting the contract."""
    try:
        value = parse_json(raw)
    except BadRecord as e:
        assert e.reason
        return []
    encoder = Encoder(DataConfig(template=template, max_length=max_length), tokenizer)
    examples = []
    for fmt in FORMATS:
        try:
            conversation = parse_record(value, fmt)
        except BadRecord as e:
            assert e.reason
            continue
        out = encoder.encode(conversation)
        if isinstance(out, str):
            assert out
            continue
        _check_example(out[0], tokenizer.vocab_size, max_length)
        examples.append(out[0])
    return examples


@settings(max_examples=200, **SETTINGS)
@given(
    raw=raw_line | st.one_of(*GOOD.values()).map(lambda r: json.dumps(r).encode()),
    template=st.sampled_from(sorted(BUILTIN)),
)
def test_any_line_parses_to_a_reason_or_a_valid_example(tokenizer, raw, template):
    _encode_everywhere(raw, tokenizer, template)


@settings(max_examples=20, **SETTINGS)
@given(data=st.data(), fmt=st.sampled_from(FORMATS), template=st.sampled_from(sorted(BUILTIN)))
def test_the_good_records_make_examples_in_every_format(tokenizer, data, fmt, template):
    """The fuzzed files hold records that train, so batches are checked too (not only drops)."""
    assert _encode_everywhere(json.dumps(data.draw(GOOD[fmt])).encode(), tokenizer, template)


@pytest.mark.slow  # ~5 s per example: build_data and Grain's threads
@settings(max_examples=25, **SETTINGS)
@given(
    data=st.data(),
    lines=st.lists(raw_line, max_size=12),
    fmt=st.sampled_from(FORMATS),
    template=st.sampled_from(sorted(BUILTIN)),
    packing=st.sampled_from(["first_fit", "best_fit", "concat", "none"]),
)
def test_a_hostile_file_is_counted_and_its_batches_keep_the_contract(
    tmp_path_factory, spm_path, tokenizer, data, lines, fmt, template, packing
):
    good = data.draw(
        st.lists(GOOD[fmt].map(lambda r: json.dumps(r, ensure_ascii=False).encode()), min_size=1, max_size=6)
    )
    lines = data.draw(st.permutations(lines + good))
    directory = tmp_path_factory.mktemp("fuzz")
    path = directory / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    source = SourceConfig(path=str(path), format=fmt)
    cfg = DataConfig(
        sources=(source,),
        tokenizer=str(spm_path),
        template=template,
        max_length=LENGTH,
        packing=packing,
        max_dropped_fraction=1.0,
    )
    try:
        data = build_data(cfg, seed=0, cache_dir=directory / "cache")
    except DataError as e:  # nothing trainable at all: one line
        assert "\n" not in str(e)
        return
    for report in (data.report, data.eval_report):
        assert report.records == report.examples + report.lost
        for where in report.bad_examples:
            assert re.match(rf"^{re.escape(str(path))}:\d+: \S", where), where
    assert data.report.examples >= 1  # the good records at least
    it = iter(data.train_dataset(ROWS, seed=1))
    try:
        batches = [next(it) for _ in range(2)]
    finally:
        it.close()
    for batch in batches:
        _check_batch(batch, tokenizer.pad_id, whole_examples=packing != "concat")


def _check_batch(batch: dict, pad_id: int, whole_examples: bool) -> None:
    """The batch contract of pipeline.py (as tests/data/test_pipeline.py::_segments checks it);
    `concat` splits examples across rows, so only whole examples must hold a trained token."""
    for k in ("inputs", "targets", "loss_weights", "segment_ids", "positions"):
        assert batch[k].shape == (ROWS, LENGTH)
    for r in range(ROWS):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        inputs, targets, weights = batch["inputs"][r], batch["targets"][r], batch["loss_weights"][r]
        used = int((seg > 0).sum())
        assert (seg[used:] == 0).all() and (inputs[used:] == pad_id).all() and (targets[used:] == pad_id).all()
        assert (weights[used:] == 0).all() and (pos[used:] == 0).all()
        ids = seg[:used]
        assert (np.diff(ids) >= 0).all() and (np.diff(ids) <= 1).all() and (used == 0 or ids[0] == 1)
        for s in range(1, int(ids.max(initial=0)) + 1):
            cols = np.flatnonzero(seg == s)
            assert (pos[cols] == np.arange(len(cols))).all() and (targets[cols[:-1]] == inputs[cols[1:]]).all()
            assert np.isfinite(weights[cols]).all() and (weights[cols] >= 0).all()
            assert weights[cols].any() or not whole_examples


CRAFTED = [
    _deep(100_000),
    '{"text": ' + "9" * 5000 + "}",
    '{"text": "\\ud800"}',
    "NaN",
    "[1]",
    '{"conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]}',
]


@pytest.mark.parametrize("verb", ["stats", "preview"])
def test_crafted_lines_are_skipped_by_data_stats_and_preview(tmp_path, capsys, spm_path, verb):
    good = {"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(CRAFTED + [json.dumps(good)] * 4) + "\n")
    overrides = [
        f"data.sources=[{{path: {path}, format: sharegpt}}]",
        f"data.tokenizer={spm_path}",
        "data.max_dropped_fraction=1.0",
        "data.max_length=96",
        "train.global_batch_size=4",
    ]
    assert main(["data", verb, *[a for kv in overrides for a in ("--set", kv)]]) == 0
    out = capsys.readouterr().out
    if verb == "stats":
        assert (
            "10 records, 4 good, dropped 6 (invalid JSON: 2, invalid UTF-8: 1, not an object: 2, unknown role: 1)"
            in out
        )
        assert f"{path}:1: invalid JSON (nested too deeply)" in out and f"{path}:3: invalid UTF-8" in out
    assert "Traceback" not in out
