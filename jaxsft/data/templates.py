"""Chat templates: messages -> (token ids, per-token loss weights).

ChatML renders each message as `<|im_start|>{role}\\n{content}<|im_end|>\\n`.

Contract of `render(messages, tokenizer) -> (ids int32[N], weights float32[N])`:
- The markers are inserted by id (they are control pieces, never produced by
  `tokenizer.encode`), so a marker typed inside a message stays text.
- Header (`{role}\\n`), content and the trailing `\\n` are encoded as separate texts.
  The weights therefore follow the pieces exactly: `weights[i] == 1` iff token i is
  part of an assistant message's content or the `<|im_end|>` closing it; never the
  header or the newline after the marker. Nothing is inferred from marker positions.
- No BOS. The end-of-turn id (`<|im_end|>`) is what generation stops on.
- `text_segments(messages)` yields exactly the plain texts `render` encodes, which is
  what a tokenizer for this template should be trained on.
"""

from __future__ import annotations

import weakref
from typing import Iterator, Sequence

import numpy as np

from jaxsft.data.formats import Message
from jaxsft.data.sources import DataError
from jaxsft.data.tokenizer import Tokenizer


class ChatML:
    name = "chatml"
    start = "<|im_start|>"
    end = "<|im_end|>"
    special_pieces = (start, end)

    def __init__(self):
        # Headers and the newline are a handful of constant texts: encoding them once per
        # tokenizer removes two of three encode calls per message. Weak keys: a cache
        # keyed by id() would serve stale ids to a new tokenizer at a recycled address.
        self._cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _const(self, tokenizer: Tokenizer, text: str) -> list[int]:
        cache = self._cache.setdefault(tokenizer, {})
        if text not in cache:
            cache[text] = tokenizer.encode(text)
        return cache[text]

    def check(self, tokenizer: Tokenizer) -> None:
        """Fails clearly if the tokenizer cannot render this template safely."""
        for piece in self.special_pieces:
            try:
                i = tokenizer.piece_id(piece)
            except KeyError:
                raise DataError(f"data.template={self.name}: the tokenizer has no piece {piece!r}") from None
            is_control = getattr(tokenizer, "is_control", None)
            if is_control is not None and not is_control(i):
                raise DataError(f"data.template={self.name}: tokenizer piece {piece!r} is not a control symbol, "
                                "so user text could produce it; retrain with it in control_symbols")

    def text_segments(self, messages: Sequence[Message]) -> Iterator[str]:
        for m in messages:
            yield f"{m.role}\n"
            if m.content:
                yield m.content
        yield "\n"

    def render(self, messages: Sequence[Message], tokenizer: Tokenizer,
               contents: Sequence[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and loss weights; `contents` may carry the messages' ids pre-encoded."""
        start, end = tokenizer.piece_id(self.start), tokenizer.piece_id(self.end)
        newline = self._const(tokenizer, "\n")
        ids: list[int] = []
        weights: list[float] = []
        for k, m in enumerate(messages):
            header = [start] + self._const(tokenizer, f"{m.role}\n")
            body = (contents[k] if contents is not None else tokenizer.encode(m.content)) + [end]
            trained = 1.0 if m.role == "assistant" else 0.0
            ids += header + body + newline
            weights += [0.0] * len(header) + [trained] * len(body) + [0.0] * len(newline)
        return np.asarray(ids, dtype=np.int32), np.asarray(weights, dtype=np.float32)

    def render_prompt(self, messages: Sequence[Message], tokenizer: Tokenizer) -> np.ndarray:
        """The ids a model continues to answer: the conversation, then an assistant header."""
        ids, _ = self.render(messages, tokenizer)
        header = [tokenizer.piece_id(self.start)] + self._const(tokenizer, "assistant\n")
        return np.concatenate([ids, np.asarray(header, dtype=np.int32)])

    def end_of_turn_id(self, tokenizer: Tokenizer) -> int:
        return tokenizer.piece_id(self.end)


TEMPLATES = {"chatml": ChatML()}


def get_template(name: str) -> ChatML:
    if name not in TEMPLATES:
        raise DataError(f"data.template: unknown template {name!r} (expected one of {', '.join(TEMPLATES)})")
    return TEMPLATES[name]


def render(messages: Sequence[Message], tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """ChatML ids and loss weights (see the module docstring)."""
    return TEMPLATES["chatml"].render(messages, tokenizer)


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    return TEMPLATES["chatml"].end_of_turn_id(tokenizer)
