"""Records: validation reasons, JSONL line index, bad lines reported as file:line."""

import json

import pytest

from jaxsft.data.formats import BadRecord, Message, parse_messages, to_record
from jaxsft.data.sources import BadLine, DataError, JsonlSource, expand_paths, load_jsonl

GOOD = {"messages": [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "1+1?"},
                     {"role": "assistant", "content": "2"}]}


def _reason(record) -> str:
    with pytest.raises(BadRecord) as e:
        parse_messages(record)
    return e.value.reason


def test_parse_good_record_and_round_trip():
    messages = parse_messages(GOOD)
    assert messages == [Message("system", "Be exact."), Message("user", "1+1?"), Message("assistant", "2")]
    assert to_record(messages) == GOOD


@pytest.mark.parametrize("record, reason", [
    ([1, 2], "not an object"),
    ({"text": "hi"}, "missing messages"),
    ({"messages": "hi"}, "messages not a list"),
    ({"messages": ["hi"]}, "message not an object"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": 3}]}, "content not a string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty assistant content"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": []}, "no assistant turn"),
])
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
    _write_lines(path, [
        good,                                                    # 1
        b"",                                                     # 2 blank: skipped
        b"{not json",                                            # 3
        b'{"msgs": []}',                                         # 4
        b'{"messages": [{"role": "robot", "content": "x"}]}',    # 5
        b"   ",                                                  # 6 blank: skipped
        b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',  # 7
        b'{"messages": [{"role": "user", "content": "\xff"}]}',  # 8 invalid UTF-8
        good,                                                    # 9
    ])
    records, bad = load_jsonl([str(path)])
    assert [str(w) for _, w in records] == [f"{path}:1", f"{path}:9"]
    assert [(b.line, b.reason) for b in bad] == [
        (3, "invalid JSON"), (4, "missing messages"), (5, "unknown role"),
        (7, "empty assistant content"), (8, "invalid UTF-8")]
    assert str(bad[0]).startswith(f"{path}:3: invalid JSON (")

    source = JsonlSource([str(path)])
    assert len(source) == 7  # blank lines are not indexed
    messages, where = source[6]
    assert messages == parse_messages(GOOD) and str(where) == f"{path}:9"
    messages, where = source[1]
    assert messages is None and isinstance(where, BadLine) and (where.line, where.reason) == (3, "invalid JSON")


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
