"""Records: validation reasons, JSONL line index, bad lines reported as file:line."""

import json

import pytest

from jaxsft.data.formats import BadRecord, DataError, Message, parse_messages, to_record
from jaxsft.data.sources import BadLine, JsonlSource, expand_paths, load_jsonl

GOOD = {
    "messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
    ]
}


def _reason(record) -> str:
    with pytest.raises(BadRecord) as e:
        parse_messages(record)
    return e.value.reason


def test_parse_good_record_and_round_trip():
    messages = parse_messages(GOOD)
    assert messages == [Message("system", "Be exact."), Message("user", "1+1?"), Message("assistant", "2")]
    assert to_record(messages) == GOOD


@pytest.mark.parametrize(
    "record, reason",
    [
        ([1, 2], "not an object"),
        ({"text": "hi"}, "missing messages"),
        ({"messages": "hi"}, "messages not a list"),
        ({"messages": ["hi"]}, "message not an object"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role"),
        ({"messages": [{"role": "user", "content": 3}]}, "content not a string"),
        (
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
            "empty assistant content",
        ),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": []}, "no assistant turn"),
    ],
)
def test_bad_records_name_their_reason(record, reason):
    assert _reason(record) == reason


def test_bad_record_is_a_value_error_with_detail():
    with pytest.raises(ValueError, match=r"unknown role: messages\[1\]\.role='bot'"):
        parse_messages({"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]})


def _write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_jsonl_reports_each_bad_line_with_file_and_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(GOOD).encode()
    _write_lines(
        path,
        [
            good,  # 1
            b"",  # 2 blank: skipped
            b"{not json",  # 3
            b'{"msgs": []}',  # 4
            b'{"messages": [{"role": "robot", "content": "x"}]}',  # 5
            b"   ",  # 6 blank: skipped
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',  # 7
            b'{"messages": [{"role": "user", "content": "\xff"}]}',  # 8 invalid UTF-8
            good,  # 9
        ],
    )
    records, bad = load_jsonl([str(path)])
    assert [str(w) for _, w in records] == [f"{path}:1", f"{path}:9"]
    assert [(b.line, b.reason) for b in bad] == [
        (3, "invalid JSON"),
        (4, "missing messages"),
        (5, "unknown role"),
        (7, "empty assistant content"),
        (8, "invalid UTF-8"),
    ]
    assert str(bad[0]).startswith(f"{path}:3: invalid JSON (")

    source = JsonlSource([str(path)])
    assert len(source) == 7  # blank lines are not indexed
    assert parse_messages(source.record(6)) == parse_messages(GOOD) and str(source.where(6)) == f"{path}:9"
    with pytest.raises(BadRecord, match="invalid JSON"):
        source.record(1)
    assert source.where(1).line == 3 and isinstance(bad[0], BadLine)


def test_crlf_lines_and_missing_final_newline(tmp_path):
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\r\n\r\n" + json.dumps(GOOD).encode())
    records, bad = load_jsonl([str(path)])
    assert bad == [] and [w.line for _, w in records] == [1, 3]


def test_globs_expand_in_order_and_missing_files_fail_clearly(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        (tmp_path / name).write_text(json.dumps(GOOD) + "\n")
    assert [p.name for p in expand_paths([str(tmp_path / "*.jsonl")])] == ["a.jsonl", "b.jsonl"]
    records, _ = load_jsonl([str(tmp_path / "*.jsonl")])
    assert [w.file for _, w in records] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    with pytest.raises(DataError, match=r"^data file .*nope\.jsonl does not exist$"):
        JsonlSource([str(tmp_path / "nope.jsonl")])
    with pytest.raises(DataError, match=r"matches no file"):
        JsonlSource([str(tmp_path / "*.parquet")])


# ---------------------------------------------------------------- the other formats


def test_alpaca_sharegpt_prompt_completion_text():
    from jaxsft.data.formats import parse_record

    alpaca = parse_record({"instruction": "Add", "input": "2 3", "output": "5", "system": "Be exact."}, "alpaca")
    assert alpaca == [Message("system", "Be exact."), Message("user", "Add", input="2 3"), Message("assistant", "5")]
    assert parse_record({"instruction": "Hi", "output": "Hello"}, "alpaca")[0] == Message("user", "Hi")
    share = parse_record(
        {
            "conversations": [
                {"from": "system", "value": "s"},
                {"from": "human", "value": "q"},
                {"from": "gpt", "value": "a"},
            ]
        },
        "sharegpt",
    )
    assert share == [Message("system", "s"), Message("user", "q"), Message("assistant", "a")]
    pc = parse_record({"prompt": "q", "completion": "a"}, "prompt_completion")
    assert pc == [Message("user", "q", train=False), Message("assistant", "a")]
    pc = parse_record(
        {
            "prompt": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "q2"},
            ],
            "completion": [{"role": "assistant", "content": "a2"}],
        },
        "prompt_completion",
    )
    assert [m.train for m in pc] == [False, False, False, None]  # only the completion trains
    assert parse_record({"text": "plain"}, "text") == [Message("text", "plain")]


def test_columns_remap_field_names():
    from jaxsft.data.formats import parse_record

    record = {"conv": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert parse_record(record, "messages", {"messages": "conv"})[1] == Message("assistant", "a")
    assert parse_record({"q": "Add", "a": "5"}, "alpaca", {"instruction": "q", "output": "a"})[1].content == "5"
    with pytest.raises(BadRecord, match="missing messages: no key 'conv'"):
        parse_record({"messages": []}, "messages", {"messages": "conv"})


def test_tool_calls_train_flags_and_reasoning_fields():
    from jaxsft.data.formats import parse_record

    record = {
        "messages": [
            {"role": "user", "content": "2+3?", "train": True},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}],
            },
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "5", "reasoning": "the tool said 5", "train": False},
        ]
    }
    messages = parse_record(record)
    assert messages[0].train is True and messages[3].train is False
    assert messages[1].content == "" and json.loads(messages[1].tool_calls) == [
        {"name": "add", "arguments": {"a": 2, "b": 3}}
    ]
    assert messages[2].role == "tool" and messages[3].reasoning == "the tool said 5"


@pytest.mark.parametrize(
    "fmt, record, reason",
    [
        ("alpaca", {"instruction": "x"}, "missing output"),
        ("alpaca", {"instruction": "x", "output": ""}, "empty assistant content"),
        ("alpaca", {"instruction": 3, "output": "y"}, "content not a string"),
        ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "unknown role"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"),
        ("prompt_completion", {"prompt": "x", "completion": ""}, "empty assistant content"),
        ("text", {"text": ""}, "empty text"),
        ("text", {"body": "x"}, "missing text"),
        (
            "messages",
            {"messages": [{"role": "user", "content": "x", "train": "yes"}, {"role": "assistant", "content": "y"}]},
            "train not a boolean",
        ),
        (
            "messages",
            {"messages": [{"role": "assistant", "content": "", "tool_calls": "add"}]},
            "tool_calls not a list of objects",
        ),
    ],
)
def test_bad_records_of_every_format(fmt, record, reason):
    from jaxsft.data.formats import parse_record

    with pytest.raises(BadRecord) as e:
        parse_record(record, fmt)
    assert e.value.reason == reason
