"""Batch generation from a JSONL file, and an interactive chat, over a run or an HF directory.

Contract:
    generate_file(source, prompts_path, out_path, sampling, batch_size) -> number of records written
        each input line: {"messages": [{"role", "content"}, ...]} or {"prompt": "..."}
        each output line: the input record plus "completion" (the decoded answer)
    chat(source, sampling, system, read, write, note) -> None   (read() returns None at end of input)
        answers go to write(), the banner and command output to note(); ChatLoop holds the
        commands (/help, /reset, /system TEXT, /exit) and keeps the session through a Ctrl-C.

Prompts are rendered with the run's chat template (`render_prompt`: the conversation,
then the assistant header) and generation stops at the template's end-of-turn id or the
tokenizer's EOS.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

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
        self.stop_ids = sorted(
            {i for i in (self.template.end_of_turn_id(tokenizer), tokenizer.eos_id) if i is not None}
        )
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
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in messages
    ):
        raise ConfigError(f'{where}: expected {{"prompt": str}} or {{"messages": [{{role, content}}, ...]}}')
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


def generate_file(
    source: str, prompts_path: str | Path, out_path: str | Path, sampling: Sampling, batch_size: int = 8
) -> int:
    records = _records(Path(prompts_path))
    session = Session(source, sampling)
    with open(out_path, "w") as out:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            for (record, _), text in zip(chunk, session.reply([c for _, c in chunk])):
                out.write(json.dumps({**record, "completion": text}, ensure_ascii=False) + "\n")
    return len(records)


HELP = """commands:
  /help          this list
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (/system alone shows it)
  /exit          leave (or Ctrl-D); Ctrl-C stops a reply, not the session"""


class ChatLoop:
    """One conversation: user lines become turns, `/` lines are commands.

    `reply(history) -> str` answers; `write` gets the answers, `note` everything else
    (banner, command output), so a caller can send them to different streams."""

    def __init__(
        self,
        reply: Callable[[list[Message]], str],
        system: str | None,
        write: Callable[[str], None],
        note: Callable[[str], None],
    ):
        self.reply, self.write, self.note = reply, write, note
        self.system, self.turns = system or None, []

    @property
    def history(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.turns

    def handle(self, text: str) -> bool:
        """Acts on one input line; False when the session should end."""
        if not text.strip():
            return True
        if text.startswith("/"):
            return self._command(*text.strip().split(maxsplit=1))
        self.turns.append(Message("user", text))
        try:
            answer = self.reply(self.history)
        except KeyboardInterrupt:  # Ctrl-C during a reply: drop this turn, keep the session
            self.turns.pop()
            self.note("(reply stopped)")
            return True
        self.turns.append(Message("assistant", answer))
        self.write(answer)
        return True

    def _command(self, name: str, argument: str = "") -> bool:
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.note(HELP)
        elif name == "/reset":
            self.turns = []
            self.note("(conversation cleared)")
        elif name == "/system" and argument:
            self.system = argument
            self.note("(system prompt set)")
        elif name == "/system":
            self.note(f"system prompt: {self.system!r}" if self.system else "(no system prompt)")
        else:
            self.note(f"unknown command {name}; /help lists the commands")
        return True


def banner(source: str, session: Session) -> str:
    from jaxsft.model.transformer import param_count

    model = session.model
    params = param_count(model.model_cfg, model.vocab_size)
    return (
        f"jaxsft chat: {source} ({params / 1e6:,.1f}M parameters, {model.model_cfg.n_layers} layers), "
        f"template {model.template_name}\n/help for commands, Ctrl-D or /exit to leave"
    )


def chat(
    source: str,
    sampling: Sampling,
    system: str | None,
    read: Callable[[], str | None],
    write: Callable[[str], None],
    note: Callable[[str], None] = lambda text: None,
) -> None:
    session = Session(source, sampling)
    note(banner(source, session))
    loop = ChatLoop(lambda history: session.reply([history])[0], system, write, note)
    while (text := read()) is not None and loop.handle(text):
        pass
