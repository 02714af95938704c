"""`jaxsft data check-template DIR`: vet a model's chat template before training on it.

Renders a fixed battery of conversations (single turn, system prompt, multi-turn,
whitespace-edged content, unicode, a tool call, reasoning) with the directory's
`chat_template` and tokenizer, as training would (`data.template=hf`), and reports per case:

- ids: equal to transformers' `apply_chat_template(tokenize=True)` on the same files (only
  when transformers is importable; else "not checked");
- mask: sane when every trained stretch decodes to one assistant turn's content (or its
  tool call) followed by an end-of-turn token, and no prompt text is trained;
- or refused, with the reason the training pipeline would give (BadRecord).

A case is fine when its ids are equal (or not checked) and its mask is sane, or when it is
refused with a reason. The check passes when every case is fine.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from jaxsft.data.formats import BadRecord, Conversation, parse_record
from jaxsft.data.templates import get_template

CALL = {"id": "call12345", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            },
        },
    }
]
Q, A = {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}
BATTERY = {
    "single-turn": {"messages": [Q, A]},
    "system prompt": {"messages": [{"role": "system", "content": "Be exact."}, Q, A]},
    "multi-turn": {
        "messages": [
            {"role": "user", "content": "Sort: pear apple"},
            {"role": "assistant", "content": "apple pear"},
            {"role": "user", "content": "Reverse: a b c"},
            {"role": "assistant", "content": "c b a"},
        ]
    },
    "whitespace-edged": {
        "messages": [
            {"role": "user", "content": "  spaced question \n"},
            {"role": "assistant", "content": "\n\n  spaced answer.\n\nwith lines  \n"},
        ]
    },
    "unicode": {
        "messages": [
            {"role": "user", "content": "héllo 🙂 wörld — 你好"},
            {"role": "assistant", "content": "ça va 🙂 — 好的"},
        ]
    },
    "tool call": {
        "tools": TOOLS,
        "messages": [
            Q,
            {"role": "assistant", "content": "", "tool_calls": [CALL]},
            {"role": "tool", "content": "5", "tool_call_id": "call12345", "name": "add"},
            A,
        ],
    },
    "reasoning": {"messages": [Q, {**A, "reasoning": "2 plus 3 is 5."}]},
}


@dataclasses.dataclass(frozen=True)
class CaseResult:
    name: str
    ids: str  # "equal", "not checked (...)", or where they differ
    mask: str  # "sane" or what is wrong
    refused: str | None = None  # the reason, when jaxsft refuses the conversation

    @property
    def ok(self) -> bool:
        if self.refused is not None:
            return True
        return (self.ids == "equal" or self.ids.startswith("not checked")) and self.mask == "sane"

    def line(self) -> str:
        if self.refused is not None:
            return f"{self.name}: refused ({self.refused})"
        return f"{self.name}: ids {self.ids}, mask {self.mask}"


def _reference_tokenizer(directory: Path, tokenizer):
    """transformers' tokenizer over the same files, or the reason there is none."""
    try:
        import transformers
    except ImportError:
        return None, "transformers is not installed"
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(directory / "tokenizer.json"), bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token
    )
    hf.chat_template = tokenizer.chat_template
    return hf, ""


def _compare_ids(ids: list[int], hf, template, conversation: Conversation) -> str:
    tools = json.loads(conversation.tools) if conversation.tools else None
    try:
        out = hf.apply_chat_template(template.message_dicts(conversation), tools=tools, tokenize=True)
    except Exception as e:  # noqa: BLE001 - whatever the template raised, say it
        return f"not checked (apply_chat_template failed: {' '.join(str(e).split())[:120]})"
    expected = list(out if isinstance(out, list) else out["input_ids"])
    if ids == expected:
        return "equal"
    at = next((k for k, (a, b) in enumerate(zip(ids, expected)) if a != b), min(len(ids), len(expected)))
    return f"DIFFER from apply_chat_template at token {at} (jaxsft {len(ids)} tokens, transformers {len(expected)})"


def _trained_runs(weights: np.ndarray) -> list[tuple[int, int]]:
    on = np.concatenate([[0], (weights > 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(on))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def _expected_body(m) -> str:
    if m.content.strip():
        return m.content.strip()
    return json.loads(m.calls)[0]["function"]["name"] if m.calls else ""


def mask_problem(tokenizer, template, conversation: Conversation, ids: np.ndarray, weights: np.ndarray) -> str:
    """ "sane", or the first thing wrong with the trained tokens (see the module docstring)."""
    answers = [m for m in conversation if m.role == "assistant"]
    runs = _trained_runs(weights)
    if len(runs) != len(answers):
        return f"WRONG: {len(runs)} trained stretch(es) for {len(answers)} assistant turn(s)"
    eots = tuple(template.eots) or ((tokenizer.eos_token,) if tokenizer.eos_token else ())
    prompt_words = {w for m in conversation if m.role != "assistant" for w in re.findall(r"\w{3,}", m.content)}
    for k, ((start, end), m) in enumerate(zip(runs, answers)):
        text, body = tokenizer.decode(ids[start:end]), _expected_body(m)
        if body not in text:
            return f"WRONG: trained stretch {k} {text!r} lacks the turn's text {body!r}"
        if not text.rstrip().endswith(eots):
            return f"WRONG: trained stretch {k} {text!r} does not end with an end-of-turn token {eots}"
        leaked = sorted(prompt_words & set(re.findall(r"\w{3,}", text[: text.index(body)])))
        if leaked:  # before the answer: only the header's end, reasoning or tool-call syntax belong there
            return f"WRONG: trained stretch {k} {text!r} holds prompt text {leaked[0]!r}"
    return "sane"


def check_case(name: str, record: dict, tokenizer, template, hf) -> CaseResult:
    conversation = parse_record(record)
    try:
        ids, weights = template.render(conversation, tokenizer)
    except BadRecord as e:
        return CaseResult(name, "", "", refused=str(e))
    compared = _compare_ids(ids.tolist(), hf, template, conversation) if hf is not None else ""
    return CaseResult(name, compared, mask_problem(tokenizer, template, conversation, ids, weights))


def check_template(directory: str | Path) -> tuple[list[str], bool]:
    """(report lines, whether every case is fine) for the tokenizer directory's chat template."""
    from jaxsft.data.tokenizer import load_tokenizer

    directory = Path(str(directory).removeprefix("hf:")).expanduser()
    tokenizer = load_tokenizer(f"hf:{directory}")
    template = get_template("hf", tokenizer)
    template.check(tokenizer)
    hf, why_not = _reference_tokenizer(directory, tokenizer)
    lines = [
        f"{directory}: chat template with end-of-turn {', '.join(template.eots) or tokenizer.eos_token}, "
        f"reasoning written as {template.reasoning_style}"
    ]
    results = []
    for name, record in BATTERY.items():
        result = check_case(name, record, tokenizer, template, hf)
        if hf is None and result.refused is None:
            result = dataclasses.replace(result, ids=f"not checked ({why_not})")
        results.append(result)
        lines.append(("  ok    " if result.ok else "  FAIL  ") + result.line())
    bad = [r.name for r in results if not r.ok]
    lines.append(
        f"{len(results) - len(bad)} of {len(results)} cases fine" + (f"; failing: {', '.join(bad)}" if bad else "")
    )
    return lines, not bad
