"""Chat templates: messages -> parts -> (token ids, per-token loss weights).

Every template, built-in or Hugging Face (hf_template.py), renders a conversation to a
list of `Part`s: template text, special tokens (inserted by id, never produced from
text), and each message's *body* (its content, reasoning, tool calls) tagged with the
message's index. `encode_parts` then tokenizes each text part on its own and assigns
weights from the tags alone, so the mask never depends on where markers happen to be:

- a message is trained if its `train` field says so, else by `loss_on`: `assistant`
  (every assistant turn), `last` (the final assistant turn) or `all` (every token);
  `text` messages (the `text` format) always train;
- a trained message's body parts have weight 1, and so has its end-of-turn token (the
  special token closing it) when `train_eot`; reasoning has weight 1 only under
  `reasoning=train` (`mask` renders it untrained, `drop` removes it before rendering);
- everything else (headers, markers, separators, BOS) has weight 0.

Built-ins: chatml, llama2, llama3, gemma, alpaca, xml, json; `hf` is the tokenizer's
own Jinja `chat_template`. `text_segments(messages)` yields the plain texts a template
encodes: what a SentencePiece tokenizer for it is trained on.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from jaxsft.data.formats import BadRecord, DataError, Message
from jaxsft.data.tokenizer import Tokenizer

EOS = "\x00eos"  # a special part standing for the tokenizer's own end-of-sequence token


@dataclasses.dataclass(frozen=True)
class Part:
    text: str
    special: bool = False
    message: int = -1  # the message this part belongs to; -1: template text
    kind: str = ""  # body | reasoning | eot | "" (template text)


@dataclasses.dataclass(frozen=True)
class MaskPolicy:
    loss_on: str = "assistant"  # assistant | last | all
    train_eot: bool = True
    reasoning: str = "train"  # train | mask | drop
    reasoning_history: str = "drop_as_template"  # hf templates that drop reasoning: accept | keep (refuse)


def trained_messages(messages: Sequence[Message], policy: MaskPolicy) -> list[bool]:
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    out = []
    for i, m in enumerate(messages):
        default = (
            m.role == "text"
            or policy.loss_on == "all"
            or (m.role == "assistant" and (policy.loss_on == "assistant" or i == last))
        )
        out.append(default if m.train is None else m.train)
    return out


def _weight(part: Part, trained: list[bool], policy: MaskPolicy) -> float:
    if policy.loss_on == "all":
        return 1.0
    if part.message < 0 or not trained[part.message]:
        return 0.0
    if part.kind == "reasoning":
        return float(policy.reasoning == "train")
    if part.kind == "eot":
        return float(policy.train_eot)
    return float(part.kind == "body")


class Template:
    """Base: subclasses give `parts()`, `assistant_header()`, `special_pieces`, `eot`."""

    name = ""
    special_pieces: tuple[str, ...] = ()  # control pieces a trained tokenizer needs (not EOS)
    eot = EOS
    reasoning_open, reasoning_close = "<think>\n", "\n</think>\n\n"
    # The same rendering as a Hugging Face chat template (Jinja), written into exports so the
    # exported model renders prompts in transformers as it was trained (`reasoning_content`
    # and content; tool calls are not written).
    jinja = ""

    def __init__(self):
        # Constant texts are encoded once per tokenizer. Weak keys: an id()-keyed cache
        # would serve stale ids to a new tokenizer at a recycled address.
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __reduce__(self):  # Grain workers get the template by name (the cache holds weak refs)
        return (get_template, (self.name,))

    def parts(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[Part]:
        raise NotImplementedError

    def assistant_header(self, tokenizer: Tokenizer) -> list[Part]:
        raise NotImplementedError

    def piece(self, text: str, tokenizer: Tokenizer) -> int:
        return tokenizer.eos_id if text == EOS else tokenizer.piece_id(text)

    @staticmethod
    def _uncached(part: Part) -> bool:
        return part.message >= 0 or len(part.text) > 64  # only short constant texts are cached

    def encoded_texts(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[str]:
        """The texts `render` passes to `tokenizer.encode` (for `tokenizer.prime`)."""
        return [p.text for p in self.parts(messages, tokenizer) if not p.special and self._uncached(p)]

    def _encode(self, part: Part, tokenizer: Tokenizer) -> list[int]:
        if part.special:
            return [self.piece(part.text, tokenizer)]
        if self._uncached(part):
            return tokenizer.encode(part.text)
        cache = self._cache.setdefault(tokenizer, {})
        if part.text not in cache:
            cache[part.text] = tokenizer.encode(part.text)
        return cache[part.text]

    def encode_parts(
        self,
        parts: Sequence[Part],
        trained: list[bool],
        tokenizer: Tokenizer,
        policy: MaskPolicy,
        ends: dict[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Ids and weights; `ends` (if given) receives, per message, the token offset after its last part."""
        ids: list[int] = []
        weights: list[float] = []
        for part in parts:
            piece_ids = self._encode(part, tokenizer)
            ids += piece_ids
            weights += [_weight(part, trained, policy)] * len(piece_ids)
            if ends is not None and part.message >= 0:
                ends[part.message] = len(ids)
        return np.asarray(ids, dtype=np.int32), np.asarray(weights, dtype=np.float32)

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer,
        policy: MaskPolicy = MaskPolicy(),
        ends: dict[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss weights (see the module docstring)."""
        if policy.reasoning == "drop":
            messages = [dataclasses.replace(m, reasoning=None) if m.reasoning else m for m in messages]
        return self.encode_parts(
            self.parts(messages, tokenizer), trained_messages(messages, policy), tokenizer, policy, ends
        )

    def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> np.ndarray:
        """The ids a model continues to answer: the conversation, then an assistant header."""
        parts = self.parts(messages, tokenizer) + self.assistant_header(tokenizer)
        return self.encode_parts(parts, [False] * len(messages), tokenizer, MaskPolicy())[0]

    def end_of_turn_id(self, tokenizer: Tokenizer) -> int:
        return self.piece(self.eot, tokenizer)

    def check(self, tokenizer: Tokenizer) -> None:
        """Fails clearly if the tokenizer cannot render this template safely."""
        for piece in self.special_pieces:
            try:
                i = tokenizer.piece_id(piece)
            except KeyError:
                hint = (
                    "; data.template=hf renders the tokenizer's own chat template"
                    if getattr(tokenizer, "chat_template", None)
                    else ""
                )
                raise DataError(f"data.template={self.name}: the tokenizer has no piece {piece!r}{hint}") from None
            is_control = getattr(tokenizer, "is_control", None)
            if is_control is not None and not is_control(i):
                raise DataError(
                    f"data.template={self.name}: tokenizer piece {piece!r} is not a control symbol, "
                    "so user text could produce it; retrain with it in control_symbols"
                )

    def text_segments(self, messages: Sequence[Message]) -> Iterator[str]:
        for part in self.parts(messages, None):
            if not part.special and part.text:
                yield part.text

    def body(self, i: int, m: Message, escape: Callable[[str], str] = str) -> list[Part]:
        """A message's own text: reasoning, content (+ alpaca input), tool calls."""
        out = []
        if m.reasoning:
            out.append(
                Part(escape(self.reasoning_open + m.reasoning + self.reasoning_close), message=i, kind="reasoning")
            )
        content = m.content if m.input is None else f"{m.content}\n\n{m.input}"
        if content:
            out.append(Part(escape(content), message=i, kind="body"))
        if m.tool_calls:
            out.append(
                Part(
                    escape(f"{chr(10) if content else ''}<tool_call>{m.tool_calls}</tool_call>"), message=i, kind="body"
                )
            )
        return out


def _jinja_body(escape: bool = False) -> str:
    """Jinja for `Template.body` of message `m`: reasoning, then content (JSON-escaped if `escape`)."""
    esc = (lambda x: f"(({x}) | tojson)[1:-1]") if escape else (lambda x: x)
    reasoning, content = esc("'<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n'"), esc("m['content'] or ''")
    return f"{{% if m.get('reasoning_content') %}}{{{{ {reasoning} }}}}{{% endif %}}{{{{ {content} }}}}"


class Turns(Template):
    """Templates that render each message as open(role) + body + close(role)."""

    bos: str | None = None
    roles: dict[str, str] = {}  # role -> the name the template writes

    def open(self, role: str) -> list[Part]:
        raise NotImplementedError

    def close(self, role: str, i: int) -> list[Part]:
        raise NotImplementedError

    def parts(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[Part]:
        out = [Part(self.bos, special=True)] if self.bos else []
        for i, m in enumerate(messages):
            if m.role == "text":
                out += [Part(m.content, message=i, kind="body"), Part(EOS, True, i, "eot")]
                continue
            out += self.open(m.role) + self.body(i, m, self.escape) + self.close(m.role, i)
        return out

    def escape(self, text: str) -> str:
        return text

    def assistant_header(self, tokenizer: Tokenizer) -> list[Part]:
        return self.open("assistant")


class ChatML(Turns):
    name = "chatml"
    start, end = "<|im_start|>", "<|im_end|>"
    special_pieces = (start, end)
    eot = end
    jinja = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        + _jinja_body()
        + "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )

    def open(self, role):
        return [Part(self.start, special=True), Part(f"{role}\n")]

    def close(self, role, i):
        return [Part(self.end, True, i, "eot"), Part("\n")]


class Llama3(Turns):
    name = "llama3"
    bos = "<|begin_of_text|>"
    special_pieces = (bos, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    eot = "<|eot_id|>"
    roles = {"tool": "ipython"}
    jinja = (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + ('ipython' if m['role'] == "
        "'tool' else m['role']) + '<|end_header_id|>\\n\\n' }}" + _jinja_body() + "{{ '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    )

    def open(self, role):
        return [
            Part("<|start_header_id|>", True),
            Part(self.roles.get(role, role)),
            Part("<|end_header_id|>", True),
            Part("\n\n"),
        ]

    def close(self, role, i):
        return [Part(self.eot, True, i, "eot")]


class Gemma(Turns):
    """`<start_of_turn>user|model`; a system prompt opens the first user turn (as in Gemma's own
    template), and turns must alternate user / model."""

    name = "gemma"
    bos = "<bos>"
    special_pieces = (bos, "<start_of_turn>", "<end_of_turn>")
    eot = "<end_of_turn>"
    jinja = (
        "{{ '<bos>' }}{% set system = messages[0]['content'] + '\\n\\n' if messages and messages[0]['role'] == "
        "'system' else '' %}{% for m in (messages[1:] if system else messages) %}{{ '<start_of_turn>' + ('model' "
        "if m['role'] == 'assistant' else 'user') + '\\n' }}{% if loop.first %}{{ system }}{% endif %}"
        + _jinja_body()
        + "{{ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<start_of_turn>model\\n' }}{% endif %}"
    )

    def open(self, role):
        return [Part("<start_of_turn>", True), Part(("model" if role == "assistant" else "user") + "\n")]

    def close(self, role, i):
        return [Part(self.eot, True, i, "eot"), Part("\n")]

    def parts(self, messages, tokenizer):
        system = messages[0] if messages and messages[0].role == "system" else None
        turns = messages[1:] if system else messages
        _require_alternation(self.name, [m for m in turns if m.role != "text"], ("user", "tool"))
        out = super().parts(turns, tokenizer)
        out = [dataclasses.replace(p, message=p.message + (system is not None)) if p.message >= 0 else p for p in out]
        if system is not None:
            at = 3 if len(out) > 2 and out[1].text == "<start_of_turn>" else 1
            out[at:at] = self.body(0, system) + [Part("\n\n")]
        return out


class Llama2(Template):
    """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer}</s>` per exchange."""

    name = "llama2"
    special_pieces = ("<s>",)
    jinja = (
        "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
        "{% for m in (messages if system is none else messages[1:]) %}{% if m['role'] == 'user' %}"
        "{{ '<s>[INST] ' }}{% if loop.first and system is not none %}{{ '<<SYS>>\\n' + system + "
        "'\\n<</SYS>>\\n\\n' }}{% endif %}"
        + _jinja_body()
        + "{{ ' [/INST] ' }}{% else %}"
        + _jinja_body()
        + "{{ eos_token }}{% endif %}{% endfor %}"
    )

    def parts(self, messages, tokenizer):
        if len(messages) == 1 and messages[0].role == "text":
            return [Part("<s>", True), Part(messages[0].content, message=0, kind="body"), Part(EOS, True, 0, "eot")]
        system = messages[0] if messages and messages[0].role == "system" else None
        offset = int(system is not None)
        _require_alternation(self.name, messages[offset:], ("user",))
        out: list[Part] = []
        for i, m in enumerate(messages[offset:], offset):
            if m.role == "user":
                out += [Part("<s>", True), Part("[INST] ")]
                if system is not None and i == offset:
                    out += [Part("<<SYS>>\n")] + self.body(0, system) + [Part("\n<</SYS>>\n\n")]
                out += self.body(i, m) + [Part(" [/INST] ")]
            else:
                out += self.body(i, m) + [Part(EOS, True, i, "eot")]
        return out

    def assistant_header(self, tokenizer):
        return []  # the prompt already ends with " [/INST] "


class Tagged(Turns):
    """Plain-text headers (alpaca, xml, json): the answer ends with the tokenizer's EOS."""

    heads: dict[str, str] = {}
    tails: dict[str, str] = {}

    @property
    def jinja(self) -> str:
        return (
            f"{{% set heads = {json.dumps(self.heads)} %}}{{% set tails = {json.dumps(self.tails)} %}}"
            "{% for m in messages %}{{ heads[m['role']] }}"
            + _jinja_body(escape=self.name == "json")
            + "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ tails[m['role']] }}{% endfor %}"
            "{% if add_generation_prompt %}{{ heads['assistant'] }}{% endif %}"
        )

    def open(self, role):
        return [Part(self.heads[role])]

    def close(self, role, i):
        eot = [Part(EOS, True, i, "eot")] if role == "assistant" else []
        return eot + [Part(self.tails[role])]


class Alpaca(Tagged):
    name = "alpaca"
    heads = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n", "tool": "### Input:\n"}
    tails = {"system": "\n\n", "user": "\n\n", "assistant": "\n\n", "tool": "\n\n"}

    def body(self, i, m, escape=str):
        if m.input is None:
            return super().body(i, m, escape)
        return super().body(i, dataclasses.replace(m, input=None), escape) + [
            Part("\n\n### Input:\n"),
            Part(m.input, message=i, kind="body"),
        ]


class Xml(Tagged):
    name = "xml"
    heads = {"system": "<system>", "user": "<instruction>", "assistant": "<response>", "tool": "<tool>"}
    tails = {"system": "</system>\n", "user": "</instruction>\n", "assistant": "\n", "tool": "</tool>\n"}


class Json(Tagged):
    """One JSON object per turn; bodies are JSON-escaped, so the trained text of an answer
    is its JSON string body (decode and `json.loads('"' + text + '"')` gives it back)."""

    name = "json"
    heads = {r: f'{{"role": "{r}", "content": "' for r in ("system", "user", "assistant", "tool")}
    tails = {r: '"}\n' for r in ("system", "user", "assistant", "tool")}

    def escape(self, text: str) -> str:
        return json.dumps(text, ensure_ascii=False)[1:-1]


def _require_alternation(name: str, messages: Sequence[Message], user_roles: tuple[str, ...]) -> None:
    for k, m in enumerate(messages):
        expected = user_roles if k % 2 == 0 else ("assistant",)
        if m.role not in expected:
            raise BadRecord(
                "roles out of order", f"template {name} needs user/assistant turns alternating; message {k} is {m.role}"
            )


BUILTIN = {t.name: t for t in (ChatML(), Llama2(), Llama3(), Gemma(), Alpaca(), Xml(), Json())}
TEMPLATE_NAMES = (*BUILTIN, "hf")


def get_template(name: str, tokenizer: Tokenizer | None = None) -> Template:
    """A built-in by name; `hf` needs the tokenizer whose `chat_template` it renders."""
    if name == "hf":
        from jaxsft.data.hf_template import HFTemplate

        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "data.template=hf: the tokenizer has no chat_template "
                "(use data.tokenizer: hf:/model/dir with one in tokenizer_config.json)"
            )
        return HFTemplate.for_tokenizer(tokenizer)
    if name not in BUILTIN:
        raise DataError(f"data.template: unknown template {name!r} (expected one of {', '.join(TEMPLATE_NAMES)})")
    return BUILTIN[name]


def render(messages: Sequence[Message], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """ChatML ids and loss weights under the default policy."""
    return BUILTIN["chatml"].render(messages, tokenizer)


def end_of_turn_id(tokenizer: Tokenizer, name: str = "chatml") -> int:
    return get_template(name, tokenizer).end_of_turn_id(tokenizer)
