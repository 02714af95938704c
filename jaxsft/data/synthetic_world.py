"""A small generated world for the quality suite: people and their facts, an invented
language, tools, and a `text` corpus of prose about them.

Contract: everything here is a pure function of the fixed `WORLD_SEED` (the world) or of
`(n, seed, split)` (the corpus), identical on every machine. The instruction tasks
(synthetic_tasks.py) ask about this world; the corpus states it in prose, so a base model
pretrained on the corpus knows the facts and lexicon that fine-tuning then elicits, and
its language-model loss on the held-out corpus measures forgetting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from jaxsft.data.synthetic import WORDS

WORLD_SEED = "jaxsft-world/v1"
EVAL_BUCKETS = 10  # one paragraph in ten (by the hash of its text) is held out

# WORDS is five groups in order: 10 fruits, 8 colours, 10 animals, 10 nature words, 10 objects.
WORD_CLASS = dict(zip(WORDS, ["fruit"] * 10 + ["color"] * 8 + ["animal"] * 10 + ["nature"] * 10 + ["object"] * 10))
CLASSES = ("fruit", "color", "animal", "nature", "object")
JOBS = ("baker", "pilot", "doctor", "farmer", "teacher", "painter", "sailor", "miner")
DAYS = ("today", "tomorrow", "monday", "friday")
LANGUAGE = "Veltish"
ATTRIBUTES = ("city", "job", "pet", "age")


@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    city: str
    job: str
    pet: str
    age: int


def _syllable(rng: random.Random) -> str:
    return rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")


def _unique(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        word = make(rng)
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def _build():
    rng = random.Random(WORLD_SEED)
    taken = set(WORDS)
    names = _unique(rng, 24, lambda r: (_syllable(r) + _syllable(r) + r.choice(("", "n", "r"))).capitalize(), taken)
    cities = _unique(rng, 8, lambda r: (_syllable(r) + _syllable(r) + _syllable(r)).capitalize(), taken)
    foreign = _unique(rng, len(WORDS), lambda r: _syllable(r) + _syllable(r) + r.choice(("", "k", "l")), taken)
    animals = [w for w in WORDS if WORD_CLASS[w] == "animal"]
    people = tuple(
        Person(n, rng.choice(cities), rng.choice(JOBS), rng.choice(animals), rng.randint(20, 69)) for n in names
    )
    return people, tuple(cities), dict(zip(WORDS, foreign))


PEOPLE, CITIES, LEXICON = _build()
BY_NAME = {p.name: p for p in PEOPLE}


def fact_sentences(p: Person) -> list[str]:
    return [
        f"{p.name} lives in {p.city}.",
        f"{p.name} works as a {p.job}.",
        f"{p.name} has a pet {p.pet}.",
        f"{p.name} is {p.age} years old.",
    ]


def _paragraph(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:  # facts about one or two people
        sentences = [s for p in rng.sample(PEOPLE, rng.randint(1, 2)) for s in fact_sentences(p)]
        rng.shuffle(sentences)
        return " ".join(sentences[: rng.randint(2, len(sentences))])
    if kind < 0.75:  # the lexicon
        words = rng.sample(WORDS, rng.randint(2, 4))
        return " ".join(
            rng.choice(
                (
                    f"In {LANGUAGE}, {w} is {LEXICON[w]}.",
                    f"The {LANGUAGE} word for {w} is {LEXICON[w]}.",
                    f"{LEXICON[w].capitalize()} means {w} in {LANGUAGE}.",
                )
            )
            for w in words
        )
    words = rng.sample(WORDS, rng.randint(2, 3))  # prose around the words and their classes
    p = rng.choice(PEOPLE)
    return " ".join(
        [f"A {w} is a kind of {WORD_CLASS[w]}." for w in words] + [f"One day {p.name} saw a {words[0]} near {p.city}."]
    )


def bucket(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % EVAL_BUCKETS


def text_corpus(n: int, seed: int, split: str) -> list[dict]:
    """`n` paragraphs of the world in the `text` format; eval paragraphs never occur in train."""
    rng = random.Random(f"jaxsft-world-text/{seed}/{split}")
    out = []
    while len(out) < n:
        text = _paragraph(rng)
        if (bucket(text) == 0) == (split == "eval"):
            out.append({"text": text, "task": "text"})
    return out
