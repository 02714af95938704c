"""A Hugging Face `chat_template` (Jinja) as a jaxsft template, with exact ids and masks.

Rendering runs in `jinja2.sandbox.ImmutableSandboxedEnvironment`, with a time and output
limit (jinja_limits.py), and the globals and
filters transformers provides (`raise_exception`, `strftime_now`, `tojson`, the
`{% generation %}` tag), so stock templates render the same text as
`apply_chat_template`. Then:

1. Special tokens typed in any message are swapped for private-use placeholders before
   rendering, so every special token in the rendered text came from the template; they
   are tokenized back as text.
2. The whole conversation is rendered once and tokenized once, with character offsets
   (the template's special tokens become their ids), so merges across message edges are
   those of `apply_chat_template(..., tokenize=True)`.
3. Which characters are trained comes from where each message's texts landed in the
   rendered text (hf_spans.py): a trained assistant turn from the end of its header to
   the end of its end-of-turn token. A token is trained if it overlaps a trained character.

Templates that render earlier turns differently (Qwen3 drops old reasoning, Phi-3.5 adds
EOS at the end, Mistral puts the system prompt in the last user turn, gpt-oss ends the last
turn with `<|return|>`) need nothing special: the conversation is trained as the template
renders it whole. A conversation is refused (BadRecord) only when no exact mask exists:
the template rewrote a trained text, dropped a trained turn, wrote no end-of-turn token
after it, or (under `data.reasoning_history=keep`) dropped a trained turn's reasoning.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import itertools
import json
import re
import weakref
from collections.abc import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np

from jaxsft.data import hf_spans as spans
from jaxsft.data import jinja_limits
from jaxsft.data.formats import BadRecord, Conversation, DataError, Message
from jaxsft.data.jinja_limits import LimitedSandbox
from jaxsft.data.templates import EOS, MaskPolicy, Part, Template, trained_messages
from jaxsft.data.tokenizer import Tokenizer

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
    env = LimitedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,  # sandboxed, with render limits
        extensions=[_Generation, jinja2.ext.loopcontrols],
    )
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
    def for_tokenizer(cls, tokenizer: Tokenizer) -> HFTemplate:
        if tokenizer not in cls._instances:
            cls._instances[tokenizer] = cls(tokenizer)
        return cls._instances[tokenizer]

    def __init__(self, tokenizer: Tokenizer):
        super().__init__()
        self.tokenizer = tokenizer
        self.source = tokenizer.chat_template
        self._jinja = compile_template(self.source)
        self._context = {"bos_token": tokenizer.bos_token or "", "eos_token": tokenizer.eos_token or ""}
        specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
        self._special_ids = set(tokenizer.special_tokens.values())
        self._split = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self._hide = {s: chr(PLACEHOLDER_BASE + k) for k, s in enumerate(specials)}
        self._shown = {v: k for k, v in self._hide.items()}
        self.reasoning_style = self._find_reasoning_style()
        self.eots = self._find_eots()
        self.eot = self.eots[0] if self.eots else EOS
        self._eot_re = re.compile("|".join(map(re.escape, sorted(self.eots, key=len, reverse=True))))

    def __reduce__(self):
        return (HFTemplate.for_tokenizer, (self.tokenizer,))

    # ------------------------------------------------------------------ rendering text

    def _escape(self, text: str) -> str:
        return self._split.sub(lambda m: self._hide[m.group(0)], text) if self._split and text else text

    def render_text(self, dicts: Sequence[dict], add_generation_prompt: bool = False, tools=None) -> str:
        try:
            input_chars = sum(len(str(v)) for d in dicts for v in d.values()) + len(str(tools or ""))
            return jinja_limits.render(
                self._jinja,
                input_chars,
                messages=list(dicts),
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                documents=None,
                **self._context,
            )
        except jinja2.TemplateError as e:
            raise BadRecord("template rejected the conversation", " ".join(str(e).split())) from None
        except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
            raise BadRecord("template failed", f"{type(e).__name__}: {e}") from None

    def _tools(self, messages) -> list | None:
        tools = getattr(messages, "tools", None)
        return None if tools is None else spans._hide_deep(json.loads(tools), self._escape)

    def message_dicts(self, messages: Sequence[Message], mark=None) -> list[dict]:
        return spans.message_dicts(messages, self.reasoning_style, self._escape, mark)

    # ------------------------------------------------------------------ ids with offsets

    def encode_text(self, real: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of rendered text and each token's character span in it (placeholders -> text)."""
        pieces = [self._shown.get(ch, ch) for ch in real]
        text = "".join(pieces)
        ids, offsets = self.tokenizer.encode_offsets(text, specials=True)
        if len(text) == len(real):
            return ids, offsets
        starts = list(itertools.accumulate((len(p) for p in pieces), initial=0))
        owner = [r for r, piece in enumerate(pieces) for _ in piece] + [len(real)]
        typed = [(starts[r], starts[r + 1]) for r, p in enumerate(pieces) if len(p) > 1]
        ids, offsets = self._retokenize_typed(text, ids, offsets, typed)
        return ids, [(owner[s], owner[e - 1] + 1 if e > s else owner[s]) for s, e in offsets]

    def _retokenize_typed(self, text, ids, offsets, typed):
        """Re-encodes as plain text each stretch between template special tokens that holds
        special tokens typed by a user (the first encoding matched those as specials)."""

        def template_special(k):
            s, e = offsets[k]
            return ids[k] in self._special_ids and not any(a <= s and e <= b for a, b in typed)

        out_ids, out_offsets, chunk_start, first = [], [], 0, 0
        for k in range(len(ids) + 1):
            if k < len(ids) and not template_special(k):
                continue
            chunk_end = offsets[k][0] if k < len(ids) else len(text)
            if any(chunk_start < b and a < chunk_end for a, b in typed):
                sub_ids, sub_offsets = self.tokenizer.encode_offsets(text[chunk_start:chunk_end], specials=False)
                out_ids += sub_ids
                out_offsets += [(s + chunk_start, e + chunk_start) for s, e in sub_offsets]
            else:
                out_ids += ids[first:k]
                out_offsets += offsets[first:k]
            if k < len(ids):
                out_ids.append(ids[k])
                out_offsets.append(offsets[k])
                chunk_start = offsets[k][1]
            first = k + 1
        return out_ids, out_offsets

    # ------------------------------------------------------------------ ids and weights

    def parts(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[Part]:
        """Only `text` records go through parts: BOS, the text (trained), EOS."""
        if len(messages) == 1 and messages[0].role == "text":
            bos = [Part(self.tokenizer.bos_token, True)] if self.tokenizer.bos_token else []
            return bos + [Part(messages[0].content, message=0, kind="body"), Part(EOS, True, 0, "eot")]
        raise NotImplementedError("HFTemplate.render renders conversations whole")

    def encoded_texts(self, messages: Sequence[Message], tokenizer: Tokenizer) -> list[str]:
        """A conversation is rendered whole and tokenized with offsets, never by `tokenizer.encode`."""
        if len(messages) == 1 and messages[0].role == "text":
            return super().encoded_texts(messages, tokenizer)
        return []

    def _layout(self, messages: Sequence[Message]):
        tools = self._tools(messages)
        real = self.render_text(self.message_dicts(messages), tools=tools)
        marker = spans.Marker()
        marked = self.message_dicts(messages, marker)
        elements, rewritten = spans.place(self.render_text(marked, tools=tools), real, marker.owners)
        return real, elements, rewritten, marked, tools

    def _tail(self, marked: list[dict], i: int, tools) -> str | None:
        """The generation prompt's text after its last message text: the turn's header."""
        try:
            prompt = self.render_text(marked[:i], add_generation_prompt=True, tools=tools)
        except BadRecord:
            return None
        text, at = spans.strip_markers(prompt)
        return text[max(at.values(), default=0) :]

    def _eot_find(self, real: str):
        def find(start: int, bound: int):
            m = self._eot_re.search(real, start, bound) if self.eots else None
            return None if m is None else (m.start(), m.end())

        return find

    def render(
        self,
        messages: Sequence[Message],
        tokenizer: Tokenizer,
        policy: MaskPolicy = MaskPolicy(),
        ends: dict[int, int] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        if len(messages) == 1 and messages[0].role == "text":
            return super().render(messages, tokenizer, policy, ends)
        if policy.reasoning == "drop":
            tools = getattr(messages, "tools", None)
            messages = Conversation([dataclasses.replace(m, reasoning=None) for m in messages], tools)
        real, elements, rewritten, marked, tools = self._layout(messages)
        trained = trained_messages(messages, policy)
        trained_spans, turn_ends = [], {}
        for i, m in enumerate(messages):
            own = [e for e in elements if e.message == i]
            check = trained[i] and policy.loss_on != "all"
            if check:
                _refuse_if_unmaskable(i, m, own, rewritten, policy)
            if not own or not (check or m.role == "assistant"):
                turn_ends[i] = max((e.end for e in own), default=0)
                continue
            tail = self._tail(marked, i, tools) if check and m.role == "assistant" else None
            turn = spans.turn(
                i, elements, real, tail, self._eot_find(real), policy.train_eot or not check, policy.reasoning == "mask"
            )
            turn_ends[i] = turn.end
            trained_spans += turn.spans if check else []
        ids, offsets = self.encode_text(real)
        if policy.loss_on == "all":
            weights = [1.0] * len(ids)
        else:
            weights = spans.token_weights(offsets, trained_spans)
        if ends is not None:
            starts = [s for s, _ in offsets]
            ends.update({i: bisect.bisect_left(starts, end) for i, end in turn_ends.items() if end})
        return np.asarray(ids, dtype=np.int32), np.asarray(weights, dtype=np.float32)

    def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer):
        text = self.render_text(self.message_dicts(messages), add_generation_prompt=True, tools=self._tools(messages))
        return np.asarray(self.encode_text(text)[0], dtype=np.int32)

    def assistant_header(self, tokenizer):
        raise NotImplementedError("HFTemplate.render_prompt renders the generation prompt itself")

    # ------------------------------------------------------------------ probes

    def _probe(self, messages: Sequence[Message], style: str) -> tuple[str, dict[int, int], list] | None:
        marker = spans.Marker()
        try:
            text = self.render_text(spans.message_dicts(messages, style, mark=marker))
        except BadRecord:
            return None
        stripped, at = spans.strip_markers(text)
        return stripped, at, marker.owners

    def _find_reasoning_style(self) -> str:
        """`field` if the template renders `reasoning_content`/`thinking`, `content` if it parses
        `<think>` blocks out of the content, else `none`."""
        conv = [Message("user", "x"), Message("assistant", "y", reasoning="z")]
        for style in ("field", "content"):
            if style == "content" and "</think>" not in self.source:
                break
            probe = self._probe(conv, style)
            if probe and any(kind == "reasoning" and 2 * k in probe[1] for k, (_, kind) in enumerate(probe[2])):
                return style
        return "none"

    def _specials_in(self, text: str) -> list[str]:
        return [m.group(0) for m in self._split.finditer(text)] if self._split else []

    def _find_eots(self) -> tuple[str, ...]:
        """End-of-turn tokens: the first special token after an answer (one and two turns),
        the last one after a tool call."""
        found = []
        two = [Message("user", "x"), Message("assistant", "y"), Message("user", "x"), Message("assistant", "y")]
        for conv in (two[:2], two):
            probe = self._probe(conv, "none")
            for k, (i, _) in enumerate(probe[2] if probe else []):
                if conv[i].role == "assistant" and 2 * k + 1 in probe[1]:
                    found += self._specials_in(probe[0][probe[1][2 * k + 1] :])[:1]
        call = json.dumps([{"id": "call00001", "type": "function", "function": {"name": "f", "arguments": {}}}])
        probe = self._probe([Message("user", "x"), Message("assistant", "", calls=call)], "none")
        if probe and probe[1]:
            found += self._specials_in(probe[0][max(probe[1].values()) :])[-1:]
        return tuple(dict.fromkeys(found))

    def check(self, tokenizer: Tokenizer) -> None:
        if not self.eots and tokenizer.eos_token is None:
            raise DataError(
                "data.template=hf: the chat_template ends assistant turns with no special token "
                "and the tokenizer names no eos_token"
            )

    def text_segments(self, messages):
        raise DataError("data.template=hf needs data.tokenizer: hf:/model/dir (its tokenizer is not trained)")


def _refuse_if_unmaskable(i: int, m: Message, own: list, rewritten: set[int], policy: MaskPolicy) -> None:
    """BadRecord when a trained message has no exact mask, naming the turn and why."""
    if i in rewritten:
        # The reason keeps its old name: such templates render a turn differently once later
        # turns follow (the refusal prefix-by-prefix rendering gave them).
        raise BadRecord(
            "template not prefix-stable",
            f"messages[{i}] ({m.role}): the template rewrites this "
            "text (renders it other than given), so no exact mask exists",
        )
    if not own and m.role == "assistant":
        raise BadRecord(
            "template dropped a turn",
            f"messages[{i}]: the template rendered none of this assistant turn's content or tool calls",
        )
    if policy.reasoning_history == "keep" and m.reasoning and own and not any(e.kind == "reasoning" for e in own):
        raise BadRecord(
            "template dropped reasoning",
            f"messages[{i}]: the template does not render this turn's "
            "reasoning (data.reasoning_history=keep; drop_as_template "
            "trains what the template renders)",
        )
