"""Batch generation from a JSONL file, and an interactive chat, over a run or an HF directory.

Contract:
    generate_file(source, prompts_path, out_path, sampling, batch_size) -> number of records written
        each input line: {"messages": [{"role", "content"}, ...]} or {"prompt": "..."}
        each output line: the input record plus "completion" (the decoded answer)
    chat(source, sampling, system, read, write) -> None   (read() returns None at end of input)

Prompts are rendered with the run's chat template (`render_prompt`: the conversation,
then the assistant header) and generation stops at the template's end-of-turn id or the
tokenizer's EOS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from jaxsft.config import ConfigError
from jaxsft.data.formats import Message
from jaxsft.data.templates import get_template
from jaxsft.infer import runs
from jaxsft.infer.sampler import Sampling, generate


class Session:
    """A loaded model with its template, rendering and decoding conversations."""

    def __init__(self, source: str, sampling: Sampling):
        self.model = runs.load(source)
        tokenizer = self.model.tokenizer
        self.template = get_template(self.model.template_name, tokenizer)
        self.stop_ids = sorted({i for i in (self.template.end_of_turn_id(tokenizer), tokenizer.eos_id) if i is not None})
        self.sampling = sampling

    def reply(self, conversations: list[list[Message]]) -> list[str]:
        tokenizer = self.model.tokenizer
        prompts = [list(self.template.render_prompt(c, tokenizer)) for c in conversations]
        outputs = generate(self.model.graphdef, self.model.params, prompts, self.stop_ids, self.sampling)
        return [tokenizer.decode(ids) for ids in outputs]


def _conversation(record: dict, where: str) -> list[Message]:
    if isinstance(record.get("prompt"), str):
        return [Message("user", record["prompt"])]
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                 for m in messages):
        raise ConfigError(f"{where}: expected {{\"prompt\": str}} or {{\"messages\": [{{role, content}}, ...]}}")
    return [Message(m["role"], m["content"]) for m in messages]


def _records(path: Path) -> list[tuple[dict, list[Message]]]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            out.append((record, _conversation(record, f"{path}:{n}")))
    return out


def generate_file(source: str, prompts_path: str | Path, out_path: str | Path, sampling: Sampling,
                  batch_size: int = 8) -> int:
    records = _records(Path(prompts_path))
    session = Session(source, sampling)
    with open(out_path, "w") as out:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            for (record, _), text in zip(chunk, session.reply([c for _, c in chunk])):
                out.write(json.dumps({**record, "completion": text}, ensure_ascii=False) + "\n")
    return len(records)


def chat(source: str, sampling: Sampling, system: str | None, read: Callable[[], str | None],
         write: Callable[[str], None]) -> None:
    session = Session(source, sampling)
    history = [Message("system", system)] if system else []
    while (text := read()) is not None:
        if not text.strip():
            continue
        history.append(Message("user", text))
        answer = session.reply([history])[0]
        history.append(Message("assistant", answer))
        write(answer)
