"""Record normalisers: one JSON record -> a validated list of `Message`s.

Contract: `parse_messages(record)` accepts the `messages` format
`{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` and
returns `list[Message]`, or raises `BadRecord`. A `BadRecord` carries a short,
fixed `reason` (the key that drop counts are grouped by, e.g. "unknown role") and a
free-form `detail` (which message, which value) for the per-line report. Extra keys
in a record or a message are ignored, so richer exports (names, ids) load as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot be trained on; `reason` is short and fixed per kind."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str


# A conversation is its messages in order; a plain list keeps it cheap to build and slice.
Conversation = list[Message]


def _parse_message(i: int, raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise BadRecord("message not an object", f"messages[{i}] is {type(raw).__name__}")
    role = raw.get("role")
    if role not in ROLES:
        raise BadRecord("unknown role", f"messages[{i}].role={role!r}, expected one of {', '.join(ROLES)}")
    content = raw.get("content")
    if not isinstance(content, str):
        raise BadRecord("content not a string", f"messages[{i}].content is {type(content).__name__}")
    if role == "assistant" and not content:
        # An empty answer would train only the end marker: a silent near-zero-loss example.
        raise BadRecord("empty assistant content", f"messages[{i}]")
    return Message(role, content)


def parse_messages(record: Any) -> Conversation:
    """Validates one record in the `messages` format; raises `BadRecord`."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"record is {type(record).__name__}")
    if "messages" not in record:
        raise BadRecord("missing messages", f"keys: {', '.join(map(str, record)) or 'none'}")
    raw = record["messages"]
    if not isinstance(raw, list):
        raise BadRecord("messages not a list", f"messages is {type(raw).__name__}")
    messages = [_parse_message(i, m) for i, m in enumerate(raw)]
    if not any(m.role == "assistant" for m in messages):
        raise BadRecord("no assistant turn", f"{len(messages)} messages")
    return messages


def to_record(messages: Conversation) -> dict:
    """The inverse of `parse_messages`: a JSON-able record."""
    return {"messages": [{"role": m.role, "content": m.content} for m in messages]}
