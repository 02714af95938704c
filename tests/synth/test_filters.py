"""Each synth filter and verifier on hand-made samples; the chain's parsing and its one-line errors."""

import pytest

from jaxsft.config import ConfigError
from jaxsft.synth import filters, verify
from jaxsft.synth.filters import Dedup, Length, Majority, NearDedup, Rank, Repetition, Sample, Verify


def _samples(*texts, finished=True, scores=None):
    scores = scores or [None] * len(texts)
    return [Sample(i, t, list(range(len(t.split()))), finished, s) for i, (t, s) in enumerate(zip(texts, scores))]


def _run(steps, samples, check=None):
    kept, drops = filters.apply(steps, samples, check)
    return [s.text for s in kept], dict(drops)


def test_verifiers_compare_by_task():
    assert verify.checker("arithmetic", "12")("12.0") and not verify.checker("arithmetic", "12")("13")
    assert verify.checker("convert_format", '["a", "b"]')('["a","b"]')
    assert verify.checker("tool_call", '{"name": "f", "arguments": {"x": 1, "y": 2}}')(
        '{"arguments": {"y": 2, "x": 1}, "name": "f"}'
    )
    assert not verify.checker("convert_format", '["a", "b"]')('["b", "a"]')
    words = verify.checker("reverse_words", "cat dog")
    assert words("  cat   dog\n") and not words("Cat dog") and not words("cat, dog")
    assert verify.checker("count", "3")("<think>one two three</think>\n3")  # reasoning block removed
    assert verify.checker("", None, r"^\d+$")("42") and not verify.checker("", None, r"^\d+$")("x42")
    assert verify.checker("anything", None) is None


def test_verify_keeps_the_correct_and_counts_the_rest():
    check = verify.checker("arithmetic", "4")
    assert _run([Verify()], _samples("4", "5", "4.0", "four"), check) == (["4", "4.0"], {"verify_failed": 2})
    # Without a checker every sample passes, unless a checker is required.
    assert _run([Verify()], _samples("a", "b")) == (["a", "b"], {})
    assert _run([Verify(require=True)], _samples("a", "b")) == ([], {"no_checker": 2})


def test_length_limits_and_unfinished_samples():
    samples = _samples("", "one", "one two three four") + _samples("cut off here", finished=False)
    assert _run([Length(min_tokens=1, max_tokens=3)], samples) == (
        ["one"],
        {"too_short": 1, "too_long": 1, "unfinished": 1},
    )
    kept, _ = _run([Length(min_tokens=0, finished=False)], _samples("a") + _samples("b", finished=False))
    assert kept == ["a", "b"]


def test_repetition_measures_repeated_ngrams():
    assert filters.repeated_share("a b c d", 2) == 0.0
    assert filters.repeated_share("a b a b a b", 2) == pytest.approx(1 - 2 / 5)  # grams ab ba ab ba ab
    assert _run([Repetition(n=2, max_repeated=0.5)], _samples("cat cat cat cat cat", "the cat sat down")) == (
        ["the cat sat down"],
        {"repetitive": 1},
    )


def test_exact_and_near_duplicates():
    assert _run([Dedup()], _samples("a  b", "a b", "a b c", "A b")) == (["a  b", "a b c", "A b"], {"duplicate": 1})
    assert filters.jaccard("a b c d", "a b c e", 2) == pytest.approx(2 / 4)  # {ab, bc} of {ab bc cd ce}
    near = _samples("the red cat sat on the mat", "the red cat sat on the rug", "a dog ran off")
    assert _run([NearDedup(n=2, threshold=0.6)], near) == (
        ["the red cat sat on the mat", "a dog ran off"],
        {"near_duplicate": 1},
    )
    assert _run([NearDedup(n=2, threshold=0.9)], near)[0] == [s.text for s in near]


def test_majority_vote():
    samples = _samples("7", "7.", "8", " 7 ")
    kept, drops = _run([Majority()], samples)
    assert kept == ["7", "7.", " 7 "] and drops == {"minority": 1}
    assert [s.results["votes"] for s in samples] == ["3/4", "3/4", "1/4", "3/4"]
    assert _run([Majority()], _samples("1", "2", "1", "2")) == ([], {"no_majority": 4})  # a tie
    assert _run([Majority(min_share=0.6)], _samples("1", "1", "2", "3")) == ([], {"no_majority": 4})


def test_rank_keeps_the_most_likely():
    samples = _samples("a", "b", "c", scores=[-2.0, -0.5, -1.0])
    assert _run([Rank(keep=2)], samples) == (["b", "c"], {"ranked_out": 1})
    assert [s.results["rank"] for s in samples] == [3, 1, 2]


def test_steps_compose_in_order():
    check = verify.checker("count", "3")
    samples = _samples("3", "3", "4", "3 3 3 3", "3", finished=True, scores=[-1.0, -0.2, -0.1, -0.3, -0.4])
    kept, drops = filters.apply([Verify(), Dedup(), Rank(keep=1)], samples, check)
    assert [s.index for s in kept] == [0] and dict(drops) == {"verify_failed": 2, "duplicate": 2}
    assert kept[0].results == {"verify": True, "rank": 1, "mean_logprob": -1.0}


def test_parse_specs_and_file(tmp_path):
    path = tmp_path / "filters.yaml"
    path.write_text("filters:\n  - {name: verify}\n  - {name: near_dedup, n: 2, threshold: 0.7}\n")
    steps = filters.parse(["length:max_tokens=64,finished=false", "rank:keep=2"], path)
    assert steps == (Verify(), NearDedup(2, 0.7), Length(max_tokens=64, finished=False), Rank(keep=2))
    assert filters.describe(steps)[1] == {"name": "near_dedup", "n": 2, "threshold": 0.7}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("vote", r"--filter vote: unknown filter 'vote' \(expected one of verify, length"),
        ("rank:keep=0", r"rank.keep=0: expected a value in \[1,"),
        ("near_dedup:threshold=2", r"near_dedup.threshold=2.0: expected a value in \[0, 1\]"),
        ("length:max=3", r"unknown config key .*length.max"),
        ("length:max_tokens", r"expected NAME or NAME:KEY=VALUE"),
        ("majority:min_share=lots", r"majority.min_share: expected float"),
    ],
)
def test_bad_filter_specs_are_one_line(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        filters.parse([spec])
    assert "\n" not in str(e.value)
