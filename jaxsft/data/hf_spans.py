"""Where each message landed in a Hugging Face template's rendered text, and which of
its characters are trained.

The template renders the conversation twice: as is (the text that is tokenized) and
with each message text (content, reasoning, tool-call name and string arguments)
wrapped in a pair of marker characters (plane-15 private use, one pair per text, placed
inside the text's edge whitespace so `trim` keeps them). Removing the markers gives the
real text back for every template that treats content as opaque; where a template
inspects or rewrites content, the two texts are aligned (difflib) and a marker inside
rewritten text is unplaced. Its message is then refused if it is trained.

A trained assistant turn's characters run from the end of its header to the end of its
end-of-turn token. The header is what the template's generation prompt adds after the
last message text of the prompt (`render(messages[:i], add_generation_prompt=True)`), so
text the model writes itself (`<think>`, `<tool_call>{"name": "`, gpt-oss channels) is
trained and the prompt is not. The end-of-turn token is the first of the template's
end-of-turn tokens (found by probing: the first special token after an answer, the last
after a tool call) after the turn's last text. Under `reasoning=mask` the reasoning
(with the template text before the next text of the turn) is cut out.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Sequence

from jaxsft.data.formats import BadRecord, Message

MARK_BASE = 0xF0000  # marker pair k: chr(MARK_BASE + 2k) opens, chr(MARK_BASE + 2k + 1) closes
MARK_END = 0xFFFFE


@dataclasses.dataclass(frozen=True)
class Element:
    message: int
    kind: str  # content | reasoning | call
    start: int
    end: int


class Marker:
    """Wraps texts in marker pairs and remembers whose each pair is."""

    def __init__(self):
        self.owners: list[tuple[int, str]] = []

    def __call__(self, text: str, message: int, kind: str) -> str:
        core = text.strip()
        if not core or len(self.owners) >= (MARK_END - MARK_BASE) // 2:
            return text
        k = len(self.owners)
        self.owners.append((message, kind))
        lead, trail = text[: len(text) - len(text.lstrip())], text[len(text.rstrip()) :]
        return f"{lead}{chr(MARK_BASE + 2 * k)}{core}{chr(MARK_BASE + 2 * k + 1)}{trail}"


def _hide_deep(value, hide: Callable[[str], str]):
    if isinstance(value, str):
        return hide(value)
    if isinstance(value, list):
        return [_hide_deep(v, hide) for v in value]
    if isinstance(value, dict):
        return {k: _hide_deep(v, hide) for k, v in value.items()}
    return value


def message_dicts(
    messages: Sequence[Message],
    reasoning_style: str,
    hide: Callable[[str], str] = str,
    mark: Callable[[str, int, str], str] | None = None,
) -> list[dict]:
    """The messages as a Hugging Face template reads them (`mark` wraps texts in markers).

    Reasoning goes in `reasoning_content` and `thinking` (style `field`), before the content
    as `<think>\\n...\\n</think>\\n\\n` (style `content`: templates that parse it there), or
    nowhere (style `none`: the template has no place for it)."""
    mark = mark or (lambda text, i, kind: text)
    out = []
    for i, m in enumerate(messages):
        content = mark(hide(m.content if m.input is None else f"{m.content}\n\n{m.input}"), i, "content")
        d = {"role": m.role, "content": content}
        if m.reasoning and reasoning_style != "none":
            reasoning = mark(hide(m.reasoning), i, "reasoning")
            if reasoning_style == "field":
                d["reasoning_content"] = d["thinking"] = reasoning
            else:
                d["content"] = f"<think>\n{reasoning}\n</think>\n\n{content}"
        if m.calls:
            d["tool_calls"] = [_call(c, i, hide, mark) for c in json.loads(m.calls)]
        for key in ("tool_call_id", "name"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        out.append(d)
    return out


def _call(call: dict, i: int, hide, mark) -> dict:
    function = dict(call["function"])
    function["name"] = mark(hide(function["name"]), i, "call")
    args = function.get("arguments")
    function["arguments"] = mark(hide(args), i, "call") if isinstance(args, str) else _hide_deep(args, hide)
    return {**call, "function": function}


def strip_markers(marked: str) -> tuple[str, dict[int, int]]:
    """The text without markers, and each marker's position in it."""
    out, at = [], {}
    for ch in marked:
        o = ord(ch)
        if MARK_BASE <= o < MARK_END:
            at.setdefault(o - MARK_BASE, len(out))  # a text a template echoes: its first place
        else:
            out.append(ch)
    return "".join(out), at


def _aligner(a: str, b: str):
    blocks = [blk for blk in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks() if blk.size]

    def move(p: int, opening: bool) -> int | None:
        for i, j, n in blocks:
            if (i <= p < i + n) if opening else (i < p <= i + n):
                return j + p - i
        return None

    return move


def place(marked: str, real: str, owners: list[tuple[int, str]]) -> tuple[list[Element], set[int]]:
    """Elements of the real text, and the messages whose texts the template rewrote."""
    text, at = strip_markers(marked)
    move = (lambda p, opening: p) if text == real else _aligner(text, real)
    elements, rewritten = [], set()
    for k, (message, kind) in enumerate(owners):
        if 2 * k not in at and 2 * k + 1 not in at:
            continue  # not rendered (dropped by the template)
        start = move(at[2 * k], True) if 2 * k in at else None
        end = move(at[2 * k + 1], False) if 2 * k + 1 in at else None
        if start is None or end is None or end < start:
            rewritten.add(message)
        else:
            elements.append(Element(message, kind, start, end))
    return sorted(elements, key=lambda e: e.start), rewritten


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclasses.dataclass(frozen=True)
class Turn:
    start: int  # first trained character
    end: int  # after the end-of-turn token (or after the last text)
    spans: tuple[tuple[int, int], ...]  # trained character intervals


def turn(
    i: int,
    elements: list[Element],
    text: str,
    tail: str | None,
    eot_find: Callable[[int, int], tuple | None],
    train_eot: bool,
    mask_reasoning: bool,
) -> Turn:
    """Trained characters of message i (see the module docstring); raises BadRecord."""
    own = [e for e in elements if e.message == i]
    first, last = min(e.start for e in own), max(e.end for e in own)
    others = [e for e in elements if e.message != i]
    inside = [e.message for e in others if first < e.end and e.start < last]
    if inside:
        raise BadRecord("template interleaves turns", f"messages[{i}] is rendered around messages[{inside[0]}]")
    prev_end = max((e.end for e in others if e.end <= first), default=0)
    start = first if tail is None else prev_end + common_prefix(tail, text[prev_end:first])
    bound = min((e.start for e in others if e.start >= last), default=len(text))
    eot = eot_find(last, bound)
    if eot is None and train_eot:
        raise BadRecord("no end-of-turn token", f"messages[{i}]: the template writes no end-of-turn token after it")
    end = last if eot is None else (eot[1] if train_eot else eot[0])
    spans = [(start, end)]
    reasoning = [e for e in own if e.kind == "reasoning"]
    if mask_reasoning and reasoning:
        r = reasoning[0]
        cut_start = start if r.start == first else r.start
        cut_end = min((e.start for e in own if e.start >= r.end and e is not r), default=r.end)
        spans = [s for s in ((start, cut_start), (cut_end, end)) if s[1] > s[0]]
    return Turn(start, max(end, last), tuple(spans))


def token_weights(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[float]:
    """1.0 for a token that overlaps a trained span (an empty token: that starts in one)."""
    out = []
    for s, e in offsets:
        hit = any((s < b and e > a) if e > s else (a <= s < b) for a, b in spans)
        out.append(float(hit))
    return out
