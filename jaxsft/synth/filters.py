"""Filters and rankers over the K samples of one prompt, as a composable chain.

Job: decide which generated samples of a prompt are written, record why each one was
dropped, and leave each kept sample's results on it (provenance).

Contract:
    parse(specs, path) -> tuple of steps          `--filter NAME[:KEY=VALUE,...]` (repeatable) and/or
                                                  `--filters FILE.yaml` (a list of {name: NAME, KEY: VALUE})
    apply(steps, samples, check) -> (kept samples, {reason: count})
        steps run in the order given, each on the samples the earlier ones kept;
        `check` is the record's verifier (verify.checker) or None.

Steps (keys and defaults in the dataclasses below; reasons in brackets):
    verify       the record's checker accepts the answer [verify_failed]; with
                 `require: true` a record without a checker loses every sample [no_checker]
    length       response tokens in [min_tokens, max_tokens] [too_short, too_long]; with
                 `finished: true` a sample cut at max_new_tokens is dropped [unfinished]
    repetition   share of repeated word n-grams at most `max_repeated` [repetitive]
    dedup        a sample whose whitespace-collapsed text equals an earlier kept one [duplicate]
    near_dedup   word n-gram Jaccard >= `threshold` with an earlier kept sample [near_duplicate]
    majority     keep the samples whose answer (verify.vote_key) is the most common one, when
                 it holds at least `min_share` of the samples still in and no other answer
                 ties it [minority, no_majority]
    rank         keep the `keep` samples of highest mean log-likelihood under the model
                 (likelihood.py) [ranked_out]

Every step writes its result into `sample.results` (e.g. `verify: true`, `votes: "3/4"`,
`rank: 1`), which the writer keeps as the record's provenance.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxsft import config_load
from jaxsft.config import ConfigError
from jaxsft.synth import verify


@dataclasses.dataclass
class Sample:
    index: int  # 0..K-1 within its prompt
    text: str
    tokens: list[int]  # the generated ids, stop id excluded
    finished: bool  # ended at a stop id, not at max_new_tokens
    mean_logprob: float | None = None  # filled when a `rank` step is configured
    results: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Verify:
    require: bool = False


@dataclasses.dataclass(frozen=True)
class Length:
    min_tokens: int = 1
    max_tokens: int = 0  # 0: no upper limit
    finished: bool = True


@dataclasses.dataclass(frozen=True)
class Repetition:
    n: int = 3
    max_repeated: float = 0.5


@dataclasses.dataclass(frozen=True)
class Dedup:
    pass


@dataclasses.dataclass(frozen=True)
class NearDedup:
    n: int = 3
    threshold: float = 0.8


@dataclasses.dataclass(frozen=True)
class Majority:
    min_share: float = 0.5


@dataclasses.dataclass(frozen=True)
class Rank:
    keep: int = 1


STEPS = {
    "verify": Verify,
    "length": Length,
    "repetition": Repetition,
    "dedup": Dedup,
    "near_dedup": NearDedup,
    "majority": Majority,
    "rank": Rank,
}
NAMES = {cls: name for name, cls in STEPS.items()}
RANGES = {  # (low, high) inclusive, per key: checked once, at parse time
    "n": (1, 16),
    "max_repeated": (0.0, 1.0),
    "threshold": (0.0, 1.0),
    "min_share": (0.0, 1.0),
    "keep": (1, 2**31 - 1),
    "min_tokens": (0, 2**31 - 1),
    "max_tokens": (0, 2**31 - 1),
}


def _step(raw: dict, where: str):
    raw = dict(raw)
    name = raw.pop("name", None)
    if name not in STEPS:
        raise ConfigError(f"{where}: unknown filter {name!r} (expected one of {', '.join(STEPS)})")
    step = config_load._build(STEPS[name], raw, f"{where}: {name}.")
    for key, value in dataclasses.asdict(step).items():
        low, high = RANGES.get(key, (None, None))
        if low is not None and not low <= value <= high:
            raise ConfigError(f"{where}: {name}.{key}={value}: expected a value in [{low:g}, {high:g}]")
    return step


def _spec(text: str) -> dict:
    """`near_dedup:n=2,threshold=0.7` -> {name: near_dedup, n: 2, threshold: 0.7} (values as YAML)."""
    name, _, options = text.partition(":")
    raw: dict[str, Any] = {"name": name.strip()}
    for option in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = option.partition("=")
        if not eq:
            raise ConfigError(f"--filter {text}: expected NAME or NAME:KEY=VALUE,..., got {option!r}")
        raw[key.strip()] = yaml.safe_load(value)
    return raw


def parse(specs: Sequence[str] = (), path: str | Path | None = None) -> tuple:
    steps = []
    if path:
        listed = yaml.safe_load(Path(path).read_text())
        listed = listed.get("filters") if isinstance(listed, dict) else listed
        if not isinstance(listed, list) or not all(isinstance(s, dict) for s in listed):
            raise ConfigError(f"{path}: expected a list of filters, each {{name: NAME, KEY: VALUE, ...}}")
        steps += [_step(s, f"{path}: filters[{i}]") for i, s in enumerate(listed)]
    steps += [_step(_spec(s), f"--filter {s}") for s in specs]
    return tuple(steps)


def describe(steps: Sequence) -> list[dict]:
    """The chain as plain data (provenance, the resume check)."""
    return [{"name": NAMES[type(s)], **dataclasses.asdict(s)} for s in steps]


# ----------------------------------------------------------------------------- text measures


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    words = text.split()
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)] if len(words) >= n else [tuple(words)]


def repeated_share(text: str, n: int) -> float:
    """1 - distinct / all word n-grams: 0 for no repetition, near 1 for a loop."""
    grams = ngrams(text, n)
    return 1.0 - len(set(grams)) / len(grams) if grams and grams[0] else 0.0


def jaccard(a: str, b: str, n: int) -> float:
    sa, sb = set(ngrams(a, n)), set(ngrams(b, n))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ----------------------------------------------------------------------------- the steps

Outcome = tuple[list[Sample], list[tuple[Sample, str]]]  # (kept, [(dropped, reason)])


def _keep_if(samples: list[Sample], reason_of: Callable[[Sample], str | None]) -> Outcome:
    kept, dropped = [], []
    for s in samples:
        reason = reason_of(s)
        if reason is None:
            kept.append(s)
        else:
            dropped.append((s, reason))
    return kept, dropped


def _verify(step: Verify, samples: list[Sample], check) -> Outcome:
    if check is None:
        for s in samples:
            s.results["verify"] = None
        return ([], [(s, "no_checker") for s in samples]) if step.require else (samples, [])
    for s in samples:
        s.results["verify"] = check(s.text)
    return _keep_if(samples, lambda s: None if s.results["verify"] else "verify_failed")


def _length(step: Length, samples: list[Sample], check) -> Outcome:
    def reason(s: Sample) -> str | None:
        if step.finished and not s.finished:
            return "unfinished"
        if len(s.tokens) < step.min_tokens:
            return "too_short"
        return "too_long" if step.max_tokens and len(s.tokens) > step.max_tokens else None

    return _keep_if(samples, reason)


def _repetition(step: Repetition, samples: list[Sample], check) -> Outcome:
    for s in samples:
        s.results["repeated_share"] = round(repeated_share(s.text, step.n), 4)
    return _keep_if(samples, lambda s: "repetitive" if s.results["repeated_share"] > step.max_repeated else None)


def _dedup(step: Dedup, samples: list[Sample], check) -> Outcome:
    seen: set[str] = set()

    def reason(s: Sample) -> str | None:
        key = " ".join(s.text.split())
        if key in seen:
            return "duplicate"
        seen.add(key)
        return None

    return _keep_if(samples, reason)


def _near_dedup(step: NearDedup, samples: list[Sample], check) -> Outcome:
    kept_texts: list[str] = []

    def reason(s: Sample) -> str | None:
        if any(jaccard(s.text, t, step.n) >= step.threshold for t in kept_texts):
            return "near_duplicate"
        kept_texts.append(s.text)
        return None

    return _keep_if(samples, reason)


def _majority(step: Majority, samples: list[Sample], check) -> Outcome:
    if not samples:
        return [], []
    votes = Counter(verify.vote_key(s.text) for s in samples)
    (winner, top), *rest = votes.most_common()
    clear = (not rest or rest[0][1] < top) and top >= step.min_share * len(samples)
    for s in samples:
        s.results["votes"] = f"{votes[verify.vote_key(s.text)]}/{len(samples)}"
    if not clear:
        return [], [(s, "no_majority") for s in samples]
    return _keep_if(samples, lambda s: None if verify.vote_key(s.text) == winner else "minority")


def _rank(step: Rank, samples: list[Sample], check) -> Outcome:
    order = sorted(samples, key=lambda s: (-(s.mean_logprob if s.mean_logprob is not None else -1e30), s.index))
    for place, s in enumerate(order, 1):
        s.results["rank"] = place
        s.results["mean_logprob"] = s.mean_logprob
    return _keep_if(samples, lambda s: None if s.results["rank"] <= step.keep else "ranked_out")


RUN = {
    Verify: _verify,
    Length: _length,
    Repetition: _repetition,
    Dedup: _dedup,
    NearDedup: _near_dedup,
    Majority: _majority,
    Rank: _rank,
}


def apply(steps: Sequence, samples: list[Sample], check=None) -> tuple[list[Sample], Counter]:
    drops: Counter = Counter()
    for step in steps:
        samples, dropped = RUN[type(step)](step, samples, check)
        drops.update(reason for _, reason in dropped)
    return samples, drops


def needs_likelihood(steps: Sequence) -> bool:
    return any(isinstance(s, Rank) for s in steps)
