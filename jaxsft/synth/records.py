"""Prompt records in, and the resumable output of `jaxsft synth`: the kept records and a ledger.

Contract:
    read_prompts(path) -> list[Prompt]     one per non-empty JSONL line, in file order; a bad
                                           line is a DataError naming file:line
    Output(out, header)                    out.jsonl (training-ready records) + out.progress.jsonl
        .done -> {line: ledger entry}      prompts finished by this and earlier invocations
        .write(prompt, records, drops)     appends one prompt's records, then its ledger line
        .totals() -> {"prompts", "generated", "kept", "dropped": {reason: n}}

A prompt line is `{"messages": [...]}` or `{"prompt": "..."}`, with optional `reference`,
`reference_regex`, `task` and any other fields (kept on the output records). A final
assistant turn is the reference (unless `reference` is given) and is not part of the prompt.

Resuming. The ledger's first line is the run's header (source, checkpoint step, sampling,
samples, batch size, filters); a later invocation with another header is refused. Then one
line per finished prompt: its line number, the sha256 of its text, and what was kept and
dropped. A prompt's records are appended (one write, flushed) before its ledger line, so
an interrupted run leaves at most one prompt's records without a ledger line: they are
removed on resume, with any line cut short, and that prompt is generated again. A finished
prompt whose text has since changed is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

from jaxsft.config import ConfigError
from jaxsft.data.formats import DataError, Message

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass
class Prompt:
    line: int  # 1-based line number in the prompts file
    sha: str  # sha256 of the line's text
    record: dict  # the input record
    messages: list[Message]  # the conversation the model continues
    reference: str | None
    regex: str | None
    task: str


def _messages(record: Any, where: str) -> list[Message]:
    if isinstance(record, dict) and isinstance(record.get("prompt"), str):
        return [Message("user", record["prompt"])]
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataError(f'{where}: expected {{"messages": [{{role, content}}, ...]}} or {{"prompt": str}}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}] needs a role ({', '.join(ROLES)}) and string content")
        out.append(Message(m["role"], m["content"]))
    return out


def _prompt(line: int, text: str, where: str) -> Prompt:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    messages = _messages(record, where)
    reference = record.get("reference")
    if messages[-1].role == "assistant":
        last = messages.pop()
        reference = last.content if reference is None else reference
    if not messages or messages[-1].role not in ("user", "tool"):
        raise DataError(f"{where}: the prompt must end with a user (or tool) turn")
    regex = record.get("reference_regex")
    if reference is not None and not isinstance(reference, (str, int, float)):
        raise DataError(f"{where}: reference must be a string or a number")
    if regex is not None and not isinstance(regex, str):
        raise DataError(f"{where}: reference_regex must be a string")
    sha = hashlib.sha256(text.encode()).hexdigest()
    task = record.get("task", record.get("category", ""))
    return Prompt(line, sha, record, messages, None if reference is None else str(reference), regex, str(task))


def read_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--prompts {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [_prompt(n, text, f"{path}:{n}") for n, text in enumerate(lines, 1) if text.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def output_record(prompt: Prompt, text: str, provenance: dict) -> dict:
    """The input record as a training-ready `messages` record answered by `text`."""
    kept = {k: v for k, v in prompt.record.items() if k not in ("messages", "prompt", "provenance")}
    messages = [{"role": m.role, "content": m.content} for m in prompt.messages]
    return {"messages": [*messages, {"role": "assistant", "content": text}], **kept, "provenance": provenance}


class Output:
    def __init__(self, out: str | Path, header: dict):
        self.path = Path(out)
        self.ledger = self.path.with_name(self.path.name + ".progress.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.entries = self._resume(header)
        self.done = {e["line"]: e for e in self.entries}

    def _resume(self, header: dict) -> list[dict]:
        header = json.loads(json.dumps(header))  # as it reads back (tuples become lists)
        if not self.ledger.is_file():
            if self.path.is_file() and self.path.stat().st_size:
                raise ConfigError(
                    f"{self.path} exists and is not a synth output (no {self.ledger.name}): use another --out"
                )
            self.path.write_text("")
            self.ledger.write_text(json.dumps({"header": header}) + "\n")
            return []
        rows = _json_lines(self.ledger)
        if not rows or rows[0].get("header") != header:
            raise ConfigError(
                f"{self.path} was written by another synth command ({self.ledger} records its settings): "
                f"use another --out, or delete both files to start again"
            )
        entries = rows[1:]
        done = {e["line"] for e in entries}
        records = _json_lines(self.path) if self.path.is_file() else []
        kept = [r for r in records if r.get("provenance", {}).get("prompt_line") in done]
        if len(kept) != sum(e["kept"] for e in entries):
            raise ConfigError(
                f"{self.path} lacks records that {self.ledger} lists as written: delete both files to start again"
            )
        if len(kept) != len(records) or not self.path.is_file():
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
            tmp.replace(self.path)
        self.ledger.write_text("".join(json.dumps(r) + "\n" for r in rows))  # drops a line cut short
        return entries

    def check_unchanged(self, prompts: list[Prompt]) -> None:
        by_line = {p.line: p for p in prompts}
        for line, entry in self.done.items():
            if line not in by_line or by_line[line].sha != entry["sha"]:
                raise ConfigError(f"{self.path}: prompt line {line} changed since it was generated; use another --out")

    def write(self, prompt: Prompt, records: list[dict], generated: int, drops: Counter) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        entry = {"line": prompt.line, "sha": prompt.sha, "generated": generated, "kept": len(records)}
        entry["dropped"] = dict(sorted(drops.items()))
        with open(self.ledger, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        self.entries.append(entry)
        self.done[prompt.line] = entry

    def totals(self) -> dict:
        dropped: Counter = Counter()
        for e in self.entries:
            dropped.update(e["dropped"])
        return {
            "prompts": len(self.entries),
            "generated": sum(e["generated"] for e in self.entries),
            "kept": sum(e["kept"] for e in self.entries),
            "dropped": dict(sorted(dropped.items())),
        }


def _json_lines(path: Path) -> list[dict]:
    """Every complete JSON line; a last line cut short by an interruption is left out."""
    out = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(text))
        except json.JSONDecodeError:
            break
    return out
