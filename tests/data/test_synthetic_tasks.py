"""The quality suite's data: families, phrasings held out, splits, answers that are right."""

import collections
import json
import re

import pytest

from jaxsft.data import synthetic_tasks as st
from jaxsft.data import synthetic_world as world
from jaxsft.data.formats import parse_messages, parse_record
from jaxsft.data.synthetic import bucket


def _last_prompt(record) -> str:
    return [m["content"] for m in record["messages"] if m["role"] == "user"][-1]


def _template_index(family: str, prompt: str) -> int | None:
    """Which phrasing of `family` produced `prompt` (templates turned into regexes)."""
    for k, template in enumerate(st.FAMILIES[family][1]):
        for part in template.split("|"):
            pattern = re.sub(r"\\\{\w+\\\}", "(.+)", re.escape(part))
            if re.fullmatch(pattern, prompt, flags=re.S):
                return k
    return None


def test_families_and_phrasings():
    assert len(st.FAMILIES) >= 12
    assert all(len(templates) >= 8 for _, templates in st.FAMILIES.values())
    assert set(st.HELD_OUT_FAMILIES) <= set(st.FAMILIES)
    assert st.generate(200, 3, "train") == st.generate(200, 3, "train")
    assert st.generate(40, 3, "eval") == st.generate(90, 3, "eval")[:40]
    with pytest.raises(ValueError, match="split"):
        st.generate(1, 0, "test")


def test_train_never_holds_held_out_phrasings_families_or_prompts():
    train, held = st.generate(2000, 0, "train"), st.generate(500, 0, "eval")
    assert {r["task"] for r in train} == set(st.FAMILIES) - set(st.HELD_OUT_FAMILIES)
    assert {r["split"] for r in train} == {"train"}
    splits = collections.Counter(r["split"] for r in held)
    assert splits["seen_phrasing"] == splits["unseen_phrasing"] == 200 and splits["unseen_task"] == 100
    train_prompts = {_last_prompt(r) for r in train}
    for r in held:
        seen = len(st.FAMILIES[r["task"]][1]) - st.HELD_OUT_PHRASINGS
        k = _template_index(r["task"], _last_prompt(r))
        if r["task"] == "dialogue":
            k = st.FAMILIES["dialogue"][1].index(_last_prompt(r))
        assert k is not None, _last_prompt(r)
        assert (r["split"] == "unseen_task") == (r["task"] in st.HELD_OUT_FAMILIES)
        if r["split"] == "seen_phrasing":
            assert k < seen and bucket(_last_prompt(r)) == 0 and _last_prompt(r) not in train_prompts
        if r["split"] == "unseen_phrasing":
            assert k >= seen
    for r in train:
        k = _template_index(r["task"], _last_prompt(r))
        assert k is not None and k < len(st.FAMILIES[r["task"]][1]) - st.HELD_OUT_PHRASINGS


def test_fewer_phrasings_for_instruction_diversity():
    for r in st.generate(1000, 0, "train", phrasings=2):
        assert _template_index(r["task"], _last_prompt(r)) in (0, 1)


def test_answers_are_right():
    checked = collections.Counter()
    for r in st.generate(1500, 1, "eval") + st.generate(1500, 1, "train"):
        parse_messages(r)
        prompt, answer = _last_prompt(r), r["messages"][-1]
        text = answer["content"]
        task = r["task"]
        if task == "fact_qa":
            person = next(p for p in world.PEOPLE if p.name in prompt)
            attribute = next(a for a in world.ATTRIBUTES if a in prompt)
            assert text == str(getattr(person, attribute))
        elif task == "translation":
            words = prompt.split(": ")[-1].strip("'?") if ": " in prompt else prompt
            assert text.split() == [world.LEXICON[w] for w in re.findall(r"[a-z]+", words) if w in world.LEXICON]
        elif task == "arithmetic_steps":
            a, sign, b, op, c = re.search(r"\((\d+) ([-+]) (\d+)\) ([+*]) (\d+)", prompt).groups()
            first = int(a) + int(b) if sign == "+" else int(a) - int(b)
            assert text == str(first + int(c) if op == "+" else first * int(c))
            assert answer["reasoning"].endswith(f"= {text}")
        elif task == "tool_call":
            call = json.loads(text)
            assert call["name"] in ("get_weather", "find_person", "send_message")
            assert all(str(v) in prompt for v in call["arguments"].values())
        elif task == "dialogue":
            assert f"Noted: {text}." in [m["content"] for m in r["messages"]]  # the earlier turn
        elif task == "refusal":
            assert text == st.REFUSAL
        elif task == "classification":
            word = next(w for w in world.WORD_CLASS if re.search(rf"\b{w}\b", prompt))
            assert text == world.WORD_CLASS[word]
        elif task == "markdown_list":
            assert text == "\n".join("- " + w for w in prompt.split(": ")[-1].split(", "))
        else:
            continue
        checked[task] += 1
    assert len(checked) == 8 and min(checked.values()) > 50, checked


def test_text_corpus():
    train, held = world.text_corpus(500, 0, "train"), world.text_corpus(100, 0, "eval")
    assert world.text_corpus(50, 0, "eval") == held[:50]
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in held)
    assert parse_record(train[0], "text", {})[0].role == "text"
    facts = " ".join(r["text"] for r in train)
    assert all(p.name in facts for p in world.PEOPLE) and sum(w in facts for w in world.LEXICON.values()) > 40
