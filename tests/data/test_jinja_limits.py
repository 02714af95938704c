"""Untrusted chat templates render within a time and output limit, or fail in one line."""

import time

import pytest

from jaxsft.data import jinja_limits
from jaxsft.data.hf_template import compile_template
from jaxsft.data.jinja_limits import RenderLimit

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _render(source, monkeypatch, seconds=0.5):
    monkeypatch.setattr(jinja_limits, "RENDER_SECONDS", seconds)
    return jinja_limits.render(compile_template(source), 10, messages=MESSAGES)


@pytest.mark.parametrize(
    "source, words",
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}", "characters"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
            "over the limit",
        ),
        ("{{ 'x' * 10**12 }}", "over the limit"),
        ("{{ (messages|length) ** 10000000 }}", "power"),
        ("{{ 'x' * 1000000000 }}", "over the limit"),
        ("{% for i in range(10**6) %}{% endfor %}", "range(1000000)"),
    ],
)
def test_runaway_template_stops_in_one_line(source, words, monkeypatch):
    start = time.monotonic()
    with pytest.raises(RenderLimit) as info:
        _render(source, monkeypatch)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "\n" not in message and message.startswith("data.template=hf: ") and words in message


def test_ordinary_templates_still_render(monkeypatch):
    source = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% for i in range(messages|length - 1, -1, -1) %}{{ i }}{% endfor %}"
        "{{ range(3)|list|length }}{% for i in range(3)|reverse %}{{ i }}{% endfor %}{{ 'ab' * 2 }}"
    )
    assert _render(source, monkeypatch) == "<user>hi<assistant>hello103210abab"
