"""Render limits for untrusted chat templates: time and output size.

Jinja's sandbox stops a template from reaching Python, but not from running forever:
`{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}` never
finishes, and `{% set ns.s = ns.s + ns.s %}` in a loop fills memory. `LimitedSandbox`
checks a deadline on every function call, every 1024 items of a `range`, and every `+`,
`*` and `**`, and bounds the size of every string or list they build and of the output.
A breach raises `RenderLimit` (a `DataError`: one line, exit code 2) — a template that
hangs on one conversation would hang on the next, so it is not a record to skip.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxsft.data.formats import DataError

RENDER_SECONDS = 10.0
MIN_OUTPUT_CHARS = 1_000_000  # output may be this, or OUTPUT_PER_INPUT x the conversation's characters
OUTPUT_PER_INPUT = 16
MAX_RANGE = 100_000  # items of one range() (Jinja's own sandbox limit)


class RenderLimit(DataError):
    pass


class _Budget(threading.local):
    deadline: float = float("inf")
    max_chars: int = MIN_OUTPUT_CHARS


class _Range:
    """`range` whose iteration checks the deadline (nested loops call nothing else)."""

    def __init__(self, env: LimitedSandbox, *args: int):
        self.env, self.items = env, range(*args)
        if len(self.items) > MAX_RANGE:
            raise RenderLimit(
                f"data.template=hf: the chat template asked for range({', '.join(map(str, args))}), "
                f"more than {MAX_RANGE} items"
            )

    def __iter__(self):
        return self._checked(iter(self.items))

    def __reversed__(self):
        return self._checked(reversed(self.items))

    def _checked(self, items):
        for k, i in enumerate(items):
            if k % 1024 == 0:
                self.env.check_time()
            yield i

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k]


class LimitedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**"})

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.budget = _Budget()
        self.globals["range"] = lambda *args: _Range(self, *args)

    def check_time(self) -> None:
        if time.monotonic() > self.budget.deadline:
            raise RenderLimit(
                f"data.template=hf: the chat template ran for more than {RENDER_SECONDS:g}s on one "
                f"conversation (a runaway loop?); fix or replace the template"
            )

    def _check_size(self, n: int) -> None:
        if n > self.budget.max_chars:
            raise RenderLimit(
                f"data.template=hf: the chat template built a value of {n:,} items, over the limit "
                f"of {self.budget.max_chars:,} for this conversation"
            )

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's signature
        __self.check_time()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        self.check_time()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self._check_size(len(seq) * max(n, 0))
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
            raise RenderLimit(f"data.template=hf: the chat template computes a power of {right}")
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, (str, list, tuple)):
            self._check_size(len(result))
        return result


def render(template: jinja2.Template, input_chars: int, **context) -> str:
    """`template.render(**context)` within the time and output limits."""
    env: LimitedSandbox = template.environment  # type: ignore[assignment]
    env.budget.deadline = time.monotonic() + RENDER_SECONDS
    env.budget.max_chars = max(MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT * input_chars)
    try:
        out, size = [], 0
        for chunk in template.generate(**context):
            size += len(chunk)
            if size > env.budget.max_chars:
                raise RenderLimit(
                    f"data.template=hf: the chat template wrote more than {env.budget.max_chars:,} "
                    f"characters for one conversation"
                )
            out.append(chunk)
        return "".join(out)
    finally:
        env.budget.deadline = float("inf")
