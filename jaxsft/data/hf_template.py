"""A Hugging Face `chat_template` (Jinja) as a jaxsft template, with exact masks.

Rendering runs in `jinja2.sandbox.ImmutableSandboxedEnvironment` with the globals and
filters transformers provides (`raise_exception`, `strftime_now`, `tojson`, the
`{% generation %}` tag), so stock templates render the same text as
`apply_chat_template`. The mask does not use generation markers. Instead:

1. Special tokens typed in any message are swapped for private-use placeholders before
   rendering, so every special token in the rendered text came from the template.
2. The conversation is rendered prefix by prefix: message i's rendering is
   `render(messages[:i+1])` minus `render(messages[:i])`. Rendering `messages[:i]` plus
   a probe message of the same role whose content is a sentinel gives that turn's
   header (text before the sentinel) and trailer (after it); what lies between them in
   the real rendering is the message's body. A template whose prefixes are not
   prefixes of the whole, or whose header changes with the content, makes the record
   bad ("template not prefix-stable"), never silently mis-masked.
3. The text is cut at template special tokens (inserted by id) and at body edges; each
   text piece is tokenized on its own. Where the tokenizer's pre-tokenizer splits at
   those edges (ByteLevel, Whitespace, Metaspace do at a newline), the ids equal
   `apply_chat_template(..., tokenize=True)`; tests/data/test_hf_parity.py checks it.

A trained message's end-of-turn token is the special token opening its trailer.
"""

from __future__ import annotations

import datetime
import json
import re
import weakref
from typing import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxsft.data.formats import BadRecord, Message
from jaxsft.data.sources import DataError
from jaxsft.data.templates import EOS, MaskPolicy, Part, Template
from jaxsft.data.tokenizer import Tokenizer

SENTINEL = "\U000f0000jaxsft-probe\U000f0001"
PLACEHOLDER_BASE = 0x100000  # plane 16 private use: one character per special token


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker) as a plain block."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise DataError(f"data.template=hf: chat_template line {e.lineno}: {e.message}") from None


class HFTemplate(Template):
    name = "hf"
    _instances: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> "HFTemplate":
        if tokenizer not in cls._instances:
            cls._instances[tokenizer] = cls(tokenizer)
        return cls._instances[tokenizer]

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self._jinja = compile_template(tokenizer.chat_template)
        self._context = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._specials = specials
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._hide = {s: chr(PLACEHOLDER_BASE + k) for k, s in enumerate(specials)}
        self._show = str.maketrans({v: k for k, v in self._hide.items()})
        self.eot = self._find_eot()

    def __reduce__(self):
        return (HFTemplate.for_tokenizer, (self.tokenizer,))

    # ------------------------------------------------------------------ rendering text

    def _escape(self, text: str) -> str:
        return self._split.sub(lambda m: self._hide[m.group(0)], text) if self._split and text else text

    def _as_dict(self, m: Message) -> dict:
        content = m.content if m.input is None else f"{m.content}\n\n{m.input}"
        if m.reasoning:
            content = self.reasoning_open + m.reasoning + self.reasoning_close + content
        out = {"role": m.role, "content": self._escape(content)}
        if m.tool_calls:
            calls = json.loads(self._escape(m.tool_calls))
            out["tool_calls"] = [{"type": "function", "function": c} for c in calls]
        return out

    def render_text(self, dicts: Sequence[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._jinja.render(messages=list(dicts), add_generation_prompt=add_generation_prompt,
                                      tools=None, documents=None, **self._context)
        except jinja2.TemplateError as e:
            raise BadRecord("template rejected the conversation", " ".join(str(e).split())) from None
        except (TypeError, KeyError, IndexError, AttributeError) as e:
            raise BadRecord("template failed", f"{type(e).__name__}: {e}") from None

    def _prefix(self, dicts: Sequence[dict]) -> str:
        if not dicts:
            try:  # some templates index messages[0] and cannot render an empty conversation
                return self._jinja.render(messages=[], add_generation_prompt=False, tools=None, documents=None,
                                          **self._context)
            except Exception:
                return ""
        return self.render_text(dicts)

    def _text_parts(self, text: str, owner: int = -1, eot: bool = False) -> list[Part]:
        """Template text cut at special tokens; the first special is the owner's end of turn."""
        out = []
        for k, piece in enumerate(self._split.split(text) if self._split else [text]):
            if not piece:
                continue
            if k % 2:
                kind = "eot" if eot and not out else ""
                out.append(Part(piece, True, owner if kind else -1, kind))
            else:
                out.append(Part(piece.translate(self._show)))
        return out

    def _turn(self, i: int, m: Message, dicts: list[dict], before: str, after: str) -> list[Part]:
        if not after.startswith(before):
            raise BadRecord("template not prefix-stable", f"rendering messages[:{i + 1}] does not extend messages[:{i}]")
        rendered = after[len(before):]
        if not rendered:
            return []  # folded into another turn (e.g. Gemma's system prompt): template text there
        probe = self.render_text(dicts[:i] + [{"role": m.role, "content": SENTINEL}])
        if probe == after:
            return self._text_parts(rendered)  # the content is rendered in a later turn, not here
        if not probe.startswith(before) or SENTINEL not in probe:
            raise BadRecord("template not prefix-stable", f"no body found for messages[{i}]")
        header, trailer = probe[len(before):].split(SENTINEL, 1)
        if not (rendered.startswith(header) and rendered.endswith(trailer)
                and len(rendered) >= len(header) + len(trailer)):
            raise BadRecord("template not prefix-stable", f"messages[{i}]: header or trailer changes with content")
        body = rendered[len(header):len(rendered) - len(trailer)]
        return self._text_parts(header) + self._body_parts(i, m, body) + self._text_parts(trailer, i, eot=True)

    def _body_parts(self, i: int, m: Message, body: str) -> list[Part]:
        out = []
        if m.reasoning:
            block = self._escape(self.reasoning_open + m.reasoning + self.reasoning_close)
            if not body.startswith(block):
                raise BadRecord("template dropped reasoning", f"messages[{i}]")
            out.append(Part(block.translate(self._show), message=i, kind="reasoning"))
            body = body[len(block):]
        if body:
            out.append(Part(body.translate(self._show), message=i, kind="body"))
        return out

    def parts(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[Part]:
        if len(messages) == 1 and messages[0].role == "text":
            bos = [Part(self.tokenizer.bos_token, True)] if self.tokenizer.bos_token else []
            return bos + [Part(messages[0].content, message=0, kind="body"), Part(EOS, True, 0, "eot")]
        dicts = [self._as_dict(m) for m in messages]
        prefixes = [self._prefix(dicts[:k]) for k in range(len(dicts) + 1)]
        out = self._text_parts(prefixes[0])
        for i, m in enumerate(messages):
            out += self._turn(i, m, dicts, prefixes[i], prefixes[i + 1])
        return out

    def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer):
        dicts = [self._as_dict(m) for m in messages]
        full = self.render_text(dicts)
        header = self.render_text(dicts, add_generation_prompt=True)[len(full):]
        parts = self.parts(messages, tokenizer) + self._text_parts(header)
        return self.encode_parts(parts, [False] * len(messages), tokenizer, MaskPolicy())[0]

    def assistant_header(self, tokenizer):
        raise NotImplementedError("HFTemplate.render_prompt renders the generation prompt itself")

    def _find_eot(self) -> str:
        """The special token closing an assistant turn (else the tokenizer's EOS)."""
        dicts = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
        try:
            trailer = self.render_text(dicts).split(SENTINEL, 1)[1]
        except (BadRecord, IndexError):
            return EOS
        parts = self._text_parts(trailer, 0, eot=True)
        return parts[0].text if parts and parts[0].kind == "eot" else EOS

    def check(self, tokenizer: Tokenizer) -> None:
        if self.eot == EOS and tokenizer.eos_token is None:
            raise DataError("data.template=hf: the chat_template ends assistant turns with no special token "
                            "and the tokenizer names no eos_token")

    def text_segments(self, messages):
        raise DataError("data.template=hf needs data.tokenizer: hf:/model/dir (its tokenizer is not trained)")
