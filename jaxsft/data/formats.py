"""Record normalisers: one record (a dict) -> a validated list of `Message`s.

Contract: `parse_record(record, format, columns)` returns `list[Message]` or raises
`BadRecord`. A `BadRecord` carries a short, fixed `reason` (the key drop counts are
grouped by, e.g. "unknown role") and a free-form `detail` for the per-line report.
`DataError` is the other kind: the data as a whole cannot be used as configured.
Extra keys are ignored. `columns` maps a format's field name to the record's (e.g.
`{"messages": "conv"}`); unmapped fields keep their names.

Formats:
  messages           {"messages": [{"role": system|user|assistant|tool, "content": str,
                      "train"?: bool, "reasoning"?: str, "tool_calls"?: [{"id"?, "type"?, "function":
                      {"name", "arguments": str | object}}], "tool_call_id"?: str, "name"?: str}],
                      "tools"?: [schema, ...]}  (tools also in prompt_completion records)
  alpaca             {"instruction", "input"?, "output", "system"?}
  sharegpt           {"conversations": [{"from": system|human|gpt|tool, "value"}]}
  prompt_completion  {"prompt": str | messages, "completion": str | messages}
  text               {"text": str}: one `text` message, trained on every token
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function_call": "assistant",
    "observation": "tool",
}


class BadRecord(ValueError):
    """A record that cannot be trained on; `reason` is short and fixed per kind."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DataError(RuntimeError):
    """The data cannot be used as configured; the message is one line, fit to print."""


@dataclasses.dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool | text
    content: str
    train: bool | None = None  # overrides data.loss_on for this message
    reasoning: str | None = None  # assistant chain of thought (data.reasoning: train | mask | drop)
    tool_calls: str | None = None  # the assistant's tool calls, as compact JSON text
    input: str | None = None  # alpaca's optional input, kept apart for the alpaca template
    # The tool calls as given (OpenAI style: id, type, function.name, function.arguments as a
    # string or an object), JSON text: what Hugging Face chat templates read.
    calls: str | None = None
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # a tool message: the tool's name


class Conversation(list):
    """A conversation is its messages in order (a plain list: cheap to build and slice),
    plus `tools`: the tool schemas offered to the model (JSON text), if the record has any."""

    def __init__(self, messages=(), tools: str | None = None):
        super().__init__(messages)
        self.tools = tools

    def __getitem__(self, k):  # a slice (a prompt for generation) keeps the tools
        out = super().__getitem__(k)
        return Conversation(out, self.tools) if isinstance(k, slice) else out


def _field(record: Mapping, name: str, columns: Mapping[str, str]) -> Any:
    key = columns.get(name, name)
    if key not in record:
        raise BadRecord(f"missing {name}", f"no key {key!r}; keys: {', '.join(map(str, record)) or 'none'}")
    return record[key]


def _string(value: Any, where: str, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise BadRecord("content not a string", f"{where} is {type(value).__name__}")
    if not empty_ok and not value:
        raise BadRecord("empty assistant content", where)
    return value


def _tool_calls(raw: Any, where: str) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise BadRecord("tool_calls not a list of objects", where)
    calls = [c.get("function", c) for c in raw]  # OpenAI style nests name/arguments under "function"
    if not all(isinstance(c, dict) for c in calls):
        raise BadRecord("tool_calls without a function name", where)
    calls = [dict(c) for c in calls]
    for call in calls:
        if isinstance(call.get("arguments"), str):  # OpenAI sends arguments as JSON text
            try:
                call["arguments"] = json.loads(call["arguments"])
            except (ValueError, RecursionError):  # not JSON, nested too deeply, an integer too long
                raise BadRecord("tool_calls arguments not JSON", where) from None
    return _json(calls, "tool_calls", separators=(", ", ": ")) if calls else None


def _json(value: Any, where: str, **kwargs) -> str:
    """JSON text of a record's value; a value nested too deeply to write back is a bad record."""
    try:
        return json.dumps(value, ensure_ascii=False, **kwargs)
    except RecursionError:
        raise BadRecord("nested too deeply", where) from None


def _parse_message(i: int, raw: Any) -> Message:
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise BadRecord("message not an object", f"{where} is {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise BadRecord("unknown role", f"{where}.role={role!r}, expected one of {', '.join(ROLES)}")
    content = raw.get("content")
    content = "" if content is None and raw.get("tool_calls") else content
    content = _string(content, f"{where}.content")
    train = raw.get("train")
    if train is not None and not isinstance(train, bool):
        raise BadRecord("train not a boolean", f"{where}.train={train!r}")
    reasoning = raw.get("reasoning", raw.get("reasoning_content"))
    if reasoning is not None:
        reasoning = _string(reasoning, f"{where}.reasoning") or None
    calls = _tool_calls(raw.get("tool_calls"), f"{where}.tool_calls") if role == "assistant" else None
    if role == "assistant" and not content and not calls:
        # An empty answer would train only the end marker: a silent near-zero-loss example.
        raise BadRecord("empty assistant content", where)
    given = _calls_as_given(raw.get("tool_calls"), where) if calls else None
    ids = {k: _optional_string(raw.get(k), f"{where}.{k}") for k in ("tool_call_id", "name")} if role == "tool" else {}
    return Message(role, content, train, reasoning if role == "assistant" else None, calls, calls=given, **ids)


def _optional_string(value: Any, where: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise BadRecord("not a string", f"{where} is {type(value).__name__}")
    return value


def _calls_as_given(raw: list, where: str) -> str:
    """OpenAI-style calls with `id`, `type` and `function` kept; arguments stay as given."""
    out = []
    for k, call in enumerate(raw):
        function = call.get("function", {k: v for k, v in call.items() if k in ("name", "arguments")})
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRecord("tool_calls without a function name", f"{where}.tool_calls[{k}]")
        given = {"type": call.get("type", "function"), "function": function}
        if call.get("id") is not None:
            given = {"id": _optional_string(call["id"], f"{where}.tool_calls[{k}].id"), **given}
        out.append(given)
    return _json(out, f"{where}.tool_calls")


def _tools(record: Mapping, columns: Mapping[str, str]) -> str | None:
    tools = record.get(columns.get("tools", "tools"))
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecord("tools not a list of objects", f"tools is {type(tools).__name__}")
    return _json(tools, "tools") if tools else None


def _messages(raw: Any, name: str = "messages") -> list[Message]:
    if not isinstance(raw, list):
        raise BadRecord(f"{name} not a list", f"{name} is {type(raw).__name__}")
    return [_parse_message(i, m) for i, m in enumerate(raw)]


def _require_assistant(messages: list[Message]) -> list[Message]:
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord("no assistant turn", f"{len(messages)} messages")
    return messages


def from_messages(record: Mapping, columns: Mapping[str, str]) -> Conversation:
    return Conversation(_require_assistant(_messages(_field(record, "messages", columns))), _tools(record, columns))


def from_alpaca(record: Mapping, columns: Mapping[str, str]) -> Conversation:
    instruction = _string(_field(record, "instruction", columns), "instruction")
    extra = record.get(columns.get("input", "input"))
    extra = _string(extra, "input") if extra is not None else ""
    output = _string(_field(record, "output", columns), "output", empty_ok=False)
    system = record.get(columns.get("system", "system"))
    head = [Message("system", _string(system, "system"))] if system else []
    return head + [Message("user", instruction, input=extra or None), Message("assistant", output)]


def from_sharegpt(record: Mapping, columns: Mapping[str, str]) -> Conversation:
    turns = _field(record, "conversations", columns)
    if not isinstance(turns, list):
        raise BadRecord("conversations not a list", f"conversations is {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("message not an object", f"conversations[{i}] is {type(turn).__name__}")
        role = SHAREGPT_ROLES.get(turn.get("from")) if isinstance(turn.get("from"), str) else None
        if role is None:
            raise BadRecord("unknown role", f"conversations[{i}].from={turn.get('from')!r}")
        value = _string(turn.get("value"), f"conversations[{i}].value", empty_ok=role != "assistant")
        messages.append(Message(role, value))
    return _require_assistant(messages)


def from_prompt_completion(record: Mapping, columns: Mapping[str, str]) -> Conversation:
    prompt, completion = _field(record, "prompt", columns), _field(record, "completion", columns)
    head = _messages(prompt, "prompt") if isinstance(prompt, list) else [Message("user", _string(prompt, "prompt"))]
    tail = (
        _messages(completion, "completion")
        if isinstance(completion, list)
        else [Message("assistant", _string(completion, "completion", empty_ok=False))]
    )
    if any(m.role == "assistant" for m in head) and not any(m.role == "assistant" for m in tail):
        raise BadRecord("no assistant turn", "completion has no assistant message")
    # Only the completion trains; an explicit per-message `train` still wins.
    head = [m if m.train is not None else dataclasses.replace(m, train=False) for m in head]
    return Conversation(_require_assistant(head + tail), _tools(record, columns))


def from_text(record: Mapping, columns: Mapping[str, str]) -> Conversation:
    text = _string(_field(record, "text", columns), "text")
    if not text:
        raise BadRecord("empty text")
    return [Message("text", text)]


PARSERS: dict[str, Callable[[Mapping, Mapping[str, str]], Conversation]] = {
    "messages": from_messages,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "prompt_completion": from_prompt_completion,
    "text": from_text,
}


def parse_record(record: Any, fmt: str = "messages", columns: Mapping[str, str] | None = None) -> Conversation:
    """Validates one record of `fmt`; raises `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"record is {type(record).__name__}")
    return PARSERS[fmt](record, columns or {})


def parse_messages(record: Any) -> Conversation:
    """A record in the `messages` format (the synthetic tasks and most chat exports)."""
    return parse_record(record, "messages")


def to_record(messages: Conversation) -> dict:
    """The inverse of `parse_messages` for plain messages: a JSON-able record."""
    return {"messages": [{"role": m.role, "content": m.content} for m in messages]}
