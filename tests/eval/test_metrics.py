"""Metric math against hand-computed cases, and which prompt and reference a record gives."""

import json
import math

import pytest

from jaxsft.config import DataConfig
from jaxsft.data.pipeline import DataError
from jaxsft.eval import metrics, records


def test_normalize_drops_case_punctuation_and_extra_whitespace():
    assert metrics.normalize("  Hello,   World!\n") == "hello world"
    assert metrics.normalize('["a", "b"]') == "a b"
    assert metrics.normalize("¿Qué?") == "qué"


@pytest.mark.parametrize(
    "output, reference, regex, expected",
    [
        # exact, normalized, contains, json, regex
        ("Cherry Gold", "Cherry Gold", None, (True, True, True, None, None)),
        (" Cherry Gold\n", "Cherry Gold", None, (True, True, True, None, None)),  # surrounding whitespace only
        ("cherry gold.", "Cherry Gold", None, (False, True, True, None, None)),
        ("The answer is 5.", "5", None, (False, False, True, None, None)),
        ("The answer is 15", "5", None, (False, False, False, None, None)),  # whole words: 5 is not in 15
        ('["a", "b"]', '["a","b"]', None, (False, True, True, True, None)),
        ("[a, b]", '["a", "b"]', None, (False, True, True, False, None)),
        ("5", "5", None, (True, True, True, None, None)),  # a bare number is no JSON task
        ("x = 42", "42", r"\d+$", (False, False, True, None, True)),
        ("none", "42", r"\d+", (False, False, False, None, False)),
        ("anything", "", None, (False, False, False, None, None)),  # an empty reference is contained in nothing
    ],
)
def test_score(output, reference, regex, expected):
    got = metrics.score(output, reference, regex)
    assert tuple(got[m] for m in metrics.METRICS) == expected


def test_tally_counts_only_where_a_metric_applies():
    scores = [
        metrics.score("5", "5"),
        metrics.score("6", "5"),
        metrics.score('{"a": 1}', '{"a":1}'),
        metrics.score("x", "y", "x"),
    ]
    got = metrics.tally(scores)
    assert got["exact_match"] == {"hits": 1, "of": 4, "rate": 0.25}
    assert got["normalized_match"] == {"hits": 2, "of": 4, "rate": 0.5}  # '{"a": 1}' and '{"a":1}' normalise alike
    assert got["json_valid"] == {"hits": 1, "of": 1, "rate": 1.0}
    assert got["regex_match"] == {"hits": 1, "of": 1, "rate": 1.0}
    assert metrics.tally([])["contains"] == {"hits": 0, "of": 0, "rate": None}


def test_loss_summary():
    got = metrics.loss_summary(6.0, 4.0, 3.0, 2)
    assert got == {
        "examples": 2,
        "tokens": 4.0,
        "loss": 1.5,
        "perplexity": pytest.approx(math.exp(1.5)),
        "token_accuracy": 0.75,
    }
    assert metrics.loss_summary(0.0, 0.0, 0.0, 0)["loss"] is None


def _items(tmp_path, rows, regex=""):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = records.eval_splits(DataConfig(), [str(path)], 0, tmp_path / "cache")
    return records.read_items(splits, regex)


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in zip(("user", "assistant") * len(turns), turns)]


def test_reference_is_the_last_answer_or_the_reference_field(tmp_path):
    items, bad = _items(
        tmp_path,
        [
            {"messages": _chat("q1", "a1", "q2", "a2"), "task": "t"},
            {"messages": _chat("q1", "a1", "q2"), "reference": "r2", "category": "c"},
            {"messages": _chat("q1", "a1"), "reference": 7},
            {"messages": _chat("q1", "a1", "q2")},
            {"messages": "not a list"},
        ],
    )
    assert bad == {"messages not a list": 1}
    first, second, third, fourth = items
    assert [m.content for m in first.prompt] == ["q1", "a1", "q2"] and first.reference == "a2"
    assert first.task == "t" and first.source == "eval.jsonl" and first.where.endswith("eval.jsonl:1")
    assert [m.content for m in second.prompt] == ["q1", "a1", "q2"] and second.reference == "r2"
    assert second.task == "c"
    assert [m.content for m in third.prompt] == ["q1"] and third.reference == "7"  # never in the prompt
    assert fourth.reference is None and fourth.task == ""


def test_regex_from_the_record_else_the_config(tmp_path):
    items, _ = _items(
        tmp_path, [{"messages": _chat("q", "a"), "reference_regex": "^a$"}, {"messages": _chat("q", "a")}], regex="b"
    )
    assert [i.regex for i in items] == ["^a$", "b"]
    with pytest.raises(DataError, match=r"eval.jsonl:1: reference_regex '\(' is not a valid"):
        _items(tmp_path, [{"messages": _chat("q", "a"), "reference_regex": "("}])


@pytest.mark.parametrize(
    "output, expected",
    [
        ("<think>12 + 30 = 42</think>\n42", "\n42"),  # scores strip the whitespace around it
        ("<think>a</think>x<think>b</think> y", " y"),  # the text after the last block
        ("  <think>still going", ""),  # cut off while thinking: no answer
        ("42", "42"),
        ("the tag <think> mid-answer", "the tag <think> mid-answer"),
    ],
)
def test_final_answer_drops_the_thinking(output, expected):
    assert metrics.final_answer(output) == expected


def test_samples_are_scored_without_thinking_and_grouped_by_split(tmp_path):
    from jaxsft.eval import generation, samples

    items, _ = _items(
        tmp_path,
        [
            {"messages": _chat("q", "42"), "task": "add", "split": "seen_phrasing"},
            {"messages": _chat("q", "7"), "task": "add", "split": "unseen_phrasing"},
            {"messages": _chat("q", "yes"), "task": "ask", "split": "unseen_phrasing"},
        ],
    )
    assert [i.split for i in items] == ["seen_phrasing", "unseen_phrasing", "unseen_phrasing"]
    outputs = ["<think>40 + 2</think> 42", "<think>3 + 4</think>7", "no"]
    answers = [generation.Answer(text=o, stopped=True, prompt_tokens=3, new_tokens=5) for o in outputs]
    scored = [samples.sample_of(i, a) for i, a in zip(items, answers)]
    assert [s["answer"] for s in scored[:2]] == [" 42", "7"] and "answer" not in scored[2]
    assert scored[0]["output"] == outputs[0]  # the sample keeps the thinking
    report = samples.generation_report(scored)
    assert report["overall"]["exact_match"] == {"hits": 2, "of": 3, "rate": 2 / 3}
    assert report["by_split"]["seen_phrasing"]["exact_match"]["rate"] == 1.0
    assert report["by_split"]["unseen_phrasing"]["exact_match"] == {"hits": 1, "of": 2, "rate": 0.5}
    assert report["by_task"]["add"]["exact_match"]["rate"] == 1.0
    raw = samples.sample_of(items[0], answers[0], strip_thinking=False)
    assert not raw["scores"]["exact_match"] and "answer" not in raw
