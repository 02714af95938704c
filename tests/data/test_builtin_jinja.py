"""Each built-in template's Jinja twin (written into exports) renders the text its parts render."""

import pytest

from jaxsft.data.formats import Message
from jaxsft.data.hf_template import compile_template
from jaxsft.data.templates import BUILTIN, EOS

EOS_TEXT = "</s>"
CONVERSATIONS = [
    [Message("user", "What is 2 + 3?"), Message("assistant", "It is 5.")],
    [
        Message("system", "Be exact."),
        Message("user", "Hi"),
        Message("assistant", "Hello!\n\nHow can I help?"),
        Message("user", 'Quote "this"\tplease'),
        Message("assistant", "“this” — 好", reasoning="a quote"),
    ],
]


def _text(parts) -> str:
    return "".join(EOS_TEXT if p.text == EOS else p.text for p in parts)


def _dicts(messages):
    return [
        {"role": m.role, "content": m.content, **({"reasoning_content": m.reasoning} if m.reasoning else {})}
        for m in messages
    ]


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_jinja_twin_renders_the_same_text(name, k):
    template, messages = BUILTIN[name], CONVERSATIONS[k]
    jinja = compile_template(template.jinja)
    rendered = jinja.render(messages=_dicts(messages), add_generation_prompt=False, eos_token=EOS_TEXT, bos_token="")
    assert rendered == _text(template.parts(messages, None))
    prompt = jinja.render(messages=_dicts(messages[:-1]), add_generation_prompt=True, eos_token=EOS_TEXT)
    assert prompt == _text(template.parts(messages[:-1], None) + template.assistant_header(None))
