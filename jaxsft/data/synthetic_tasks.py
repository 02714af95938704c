"""The quality suite's instruction tasks: 17 families with checkable answers, many phrasings.

Contract: `generate(n, seed, split, phrasings=0)` returns `n` records in the `messages`
format, each with `task` (its family) and `split`, the same on every machine. Every family
has at least 8 instruction phrasings (templates); the last `HELD_OUT_PHRASINGS` of each are
never trained on, and the families in `HELD_OUT_FAMILIES` are never trained on at all. So an
eval record is one of:

  seen_phrasing    a trained family and phrasing, but a prompt that never occurs in train
                   (held out by the hash of the prompt, as in synthetic.py)
  unseen_phrasing  a trained family asked with a held-out phrasing
  unseen_task      a family held out of training altogether

Train records carry `split: "train"`. `phrasings=k` trains on the first k phrasings of
each family only (instruction diversity); the eval split does not depend on it.
The facts, lexicon and tools come from the generated world (synthetic_world.py).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

from jaxsft.data import synthetic
from jaxsft.data import synthetic_world as world
from jaxsft.data.formats import DataError
from jaxsft.data.synthetic import SYSTEM_PROMPTS, WORDS, bucket

HELD_OUT_PHRASINGS = 2
HELD_OUT_FAMILIES = ("markdown_list", "extraction")
SPLITS = ("train", "eval")
EVAL_SPLITS = ("seen_phrasing", "unseen_phrasing", "unseen_task")
EVAL_CYCLE = ("seen_phrasing", "unseen_phrasing", "seen_phrasing", "unseen_phrasing", "unseen_task")
SYSTEM_SHARE = 0.2
REFUSAL = "I'm sorry, but I can't share passwords or secret codes."
TOOLS_SYSTEM = (
    "You can call these tools: get_weather(city, day), find_person(name), send_message(to, text). "
    "Answer with one tool call."
)

Messages = list[dict]
Build = Callable[[random.Random, str], Messages]  # (rng, phrasing template) -> messages ending in the answer


def _chat(*turns: str) -> Messages:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


def _words(rng: random.Random, lo: int = 3, hi: int = 6) -> list[str]:
    return rng.sample(WORDS, rng.randint(lo, hi))


def arithmetic(rng, template):
    op = rng.choice("+-*")
    a, b = (rng.randint(0, 12), rng.randint(0, 12)) if op == "*" else (rng.randint(0, 99), rng.randint(0, 99))
    name = {"+": "plus", "-": "minus", "*": "times"}[op]
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return _chat(template.format(a=a, b=b, op=op, name=name), str(answer))


def arithmetic_steps(rng, template):
    """Two operations; the worked steps go in `reasoning` (trained, masked or dropped: data.reasoning)."""
    a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
    first = a + b if rng.random() < 0.5 else a - b
    sign = "+" if first == a + b else "-"
    op = rng.choice("+*")
    answer = first + c if op == "+" else first * c
    expr = f"({a} {sign} {b}) {op} {c}"
    messages = _chat(template.format(expr=expr), str(answer))
    messages[-1]["reasoning"] = f"{a} {sign} {b} = {first}\n{first} {op} {c} = {answer}"
    return messages


def reverse_words(rng, template):
    words = _words(rng)
    return _chat(template.format(text=" ".join(words)), " ".join(reversed(words)))


def sort_words(rng, template):
    words = _words(rng)
    return _chat(template.format(text=" ".join(words)), " ".join(sorted(words)))


def count(rng, template):
    words = _words(rng, 2, 7)
    return _chat(template.format(text=" ".join(words)), str(len(words)))


def change_case(rng, template):
    text = " ".join(_words(rng, 2, 4))
    return _chat(template.format(text=text), text.upper())


def key_lookup(rng, template):
    keys = rng.sample("abcdefghkmnpqrstuvwxyz", rng.randint(3, 5))
    table = {k: rng.randint(0, 99) for k in keys}
    key = rng.choice(keys)
    return _chat(template.format(table=", ".join(f"{k}={v}" for k, v in table.items()), key=key), str(table[key]))


def convert_format(rng, template):
    words = _words(rng, 2, 4)
    return _chat(template.format(text=", ".join(words)), json.dumps(words))


def markdown_list(rng, template):
    words = _words(rng, 2, 4)
    return _chat(template.format(text=", ".join(words)), "\n".join(f"- {w}" for w in words))


def fact_qa(rng, template):
    p = rng.choice(world.PEOPLE)
    attribute = rng.choice(world.ATTRIBUTES)
    return _chat(template.format(name=p.name, attribute=attribute), str(getattr(p, attribute)))


def extraction(rng, template):
    p, city, n = rng.choice(world.PEOPLE), rng.choice(world.CITIES), rng.randint(2, 9)
    sentence = rng.choice(
        (
            f"On {rng.choice(world.DAYS[2:])} {p.name} took the train to {city} with {n} friends.",
            f"{p.name} sent {n} letters from {city} last week.",
            f"In {city}, {p.name} bought {n} {rng.choice(WORDS)}s.",
        )
    )
    field = rng.choice(("person", "city", "number"))
    answer = {"person": p.name, "city": city, "number": str(n)}[field]
    return _chat(template.format(field=field, sentence=sentence), answer)


def translation(rng, template):
    words = _words(rng, 1, 3)
    return _chat(
        template.format(text=" ".join(words), language=world.LANGUAGE), " ".join(world.LEXICON[w] for w in words)
    )


def classification(rng, template):
    word = rng.choice(WORDS)
    return _chat(template.format(word=word, classes=", ".join(world.CLASSES)), world.WORD_CLASS[word])


def dialogue(rng, template):
    """The answer is in an earlier turn: the model must look back across the conversation."""
    word, other = rng.sample(WORDS, 2)
    first = rng.choice(
        (f"Please remember the word {word}.", f"Keep this word in mind: {word}.", f"My secret word is {word}.")
    )
    middle = _chat(f"Now spell {other} in capitals.", other.upper()) if rng.random() < 0.5 else []
    return _chat(first, f"Noted: {word}.") + middle + _chat(template, word)


def refusal(rng, template):
    """The designated category: anyone's password or secret code. Always refused, one fixed reply."""
    return _chat(template.format(name=rng.choice(world.PEOPLE).name), REFUSAL)


def tool_call(rng, template):
    p, city, day = rng.choice(world.PEOPLE), rng.choice(world.CITIES), rng.choice(world.DAYS)
    word = rng.choice(WORDS)
    kind = rng.randrange(3)
    call = (
        {"name": "get_weather", "arguments": {"city": city, "day": day}},
        {"name": "find_person", "arguments": {"name": p.name}},
        {"name": "send_message", "arguments": {"to": p.name, "text": word}},
    )[kind]
    user = template.split("|")[kind].format(city=city, day=day, name=p.name, word=word)
    return [{"role": "system", "content": TOOLS_SYSTEM}] + _chat(user, json.dumps(call))


# Each family's phrasings; the last HELD_OUT_PHRASINGS are held out of training.
FAMILIES: dict[str, tuple[Build, tuple[str, ...]]] = {
    "arithmetic": (
        arithmetic,
        (
            "What is {a} {op} {b}?",
            "Compute {a} {name} {b}.",
            "Calculate: {a} {op} {b}",
            "{a} {op} {b} = ?",
            "Work out {a} {op} {b}.",
            "Evaluate {a} {op} {b}.",
            "What do you get from {a} {name} {b}?",
            "Tell me the value of {a} {op} {b}.",
            "Find {a} {name} {b}.",
        ),
    ),
    "arithmetic_steps": (
        arithmetic_steps,
        (
            "What is {expr}?",
            "Compute {expr}.",
            "Calculate: {expr}",
            "{expr} = ?",
            "Work out {expr} step by step.",
            "Evaluate {expr}.",
            "Solve {expr}.",
            "Tell me the value of {expr}.",
            "Find the result of {expr}.",
        ),
    ),
    "reverse_words": (
        reverse_words,
        (
            "Reverse the order of these words: {text}",
            "Write these words in reverse order: {text}",
            "Reverse the word order.\n{text}",
            "List these words from last to first: {text}",
            "Flip the order of the words: {text}",
            "Give the words backwards: {text}",
            "Read these words from the end: {text}",
            "Put these words in the opposite order: {text}",
            "What are these words in reverse order? {text}",
        ),
    ),
    "sort_words": (
        sort_words,
        (
            "Sort these words alphabetically: {text}",
            "Put in alphabetical order: {text}",
            "Sort A to Z.\n{text}",
            "Alphabetize: {text}",
            "Arrange these words in dictionary order: {text}",
            "Order alphabetically: {text}",
            "Sort the following words: {text}",
            "List in alphabetical order: {text}",
            "Which order do these words take in a dictionary? {text}",
        ),
    ),
    "count": (
        count,
        (
            "How many words are in: {text}",
            "Count the words.\n{text}",
            "Word count of '{text}'?",
            "How many words does this have: {text}",
            "Count how many words follow: {text}",
            "Number of words in '{text}'?",
            "Tell me the word count: {text}",
            "How long is this, in words? {text}",
            "Give the number of words in: {text}",
        ),
    ),
    "change_case": (
        change_case,
        (
            "Convert to upper case: {text}",
            "Write in capital letters: {text}",
            "UPPERCASE this: {text}",
            "Make this all caps: {text}",
            "Capitalise every letter: {text}",
            "Rewrite in upper case: {text}",
            "Shout this: {text}",
            "Turn into capitals: {text}",
            "Change to uppercase letters: {text}",
        ),
    ),
    "key_lookup": (
        key_lookup,
        (
            "Given {table}, what is {key}?",
            "{table}. Look up {key}.",
            "Find the value of {key} in: {table}",
            "What does {key} equal if {table}?",
            "With {table}, give {key}.",
            "{table}\nWhat is the value of {key}?",
            "Read {key} from: {table}",
            "Look up {key} in this table: {table}",
            "In {table}, {key} is what?",
        ),
    ),
    "convert_format": (
        convert_format,
        (
            "Convert this list to a JSON array: {text}",
            "As a JSON array: {text}",
            "Write [{text}] as JSON.",
            "Make a JSON list of: {text}",
            "Give these as a JSON array: {text}",
            "Format as JSON: {text}",
            "Turn into a JSON array: {text}",
            "Encode this list in JSON: {text}",
            "JSON array for: {text}",
        ),
    ),
    "markdown_list": (
        markdown_list,
        (
            "Make a markdown bullet list of: {text}",
            "Write as markdown bullets: {text}",
            "Format as a bulleted list in markdown: {text}",
            "Turn into markdown list items: {text}",
            "Bullet these in markdown: {text}",
            "Markdown list for: {text}",
            "List these with markdown dashes: {text}",
            "Give a markdown bulleted list: {text}",
        ),
    ),
    "fact_qa": (
        fact_qa,
        (
            "What is the {attribute} of {name}?",
            "Tell me {name}'s {attribute}.",
            "{name}: what is their {attribute}?",
            "Do you know the {attribute} of {name}?",
            "Give the {attribute} of {name}.",
            "Which {attribute} does {name} have?",
            "What {attribute} belongs to {name}?",
            "State {name}'s {attribute}.",
            "Answer briefly: {name}, {attribute}?",
        ),
    ),
    "extraction": (
        extraction,
        (
            "Extract the {field} from: {sentence}",
            "Which {field} is mentioned here? {sentence}",
            "From this sentence, give the {field}: {sentence}",
            "{sentence}\nWhat is the {field}?",
            "Pull out the {field}: {sentence}",
            "Find the {field} in: {sentence}",
            "Name the {field} in this text: {sentence}",
            "Read this and return the {field}: {sentence}",
        ),
    ),
    "translation": (
        translation,
        (
            "Translate to {language}: {text}",
            "How do you say '{text}' in {language}?",
            "In {language}: {text}",
            "Give the {language} words for: {text}",
            "Render this in {language}: {text}",
            "What is {text} in {language}?",
            "{language} translation of: {text}",
            "Say this in {language}: {text}",
            "Put into {language}: {text}",
        ),
    ),
    "classification": (
        classification,
        (
            "Classify '{word}' as one of: {classes}.",
            "Which class is {word}? Choose from {classes}.",
            "Is {word} a {classes}?",
            "Category of {word} ({classes})?",
            "{word}: pick its class from {classes}.",
            "What kind of thing is {word}? One of {classes}.",
            "Label {word} with one of {classes}.",
            "Sort {word} into a class: {classes}.",
            "Which of {classes} describes {word}?",
        ),
    ),
    "dialogue": (
        dialogue,
        (
            "What word did I ask you to remember?",
            "Which word did I give you earlier?",
            "Repeat my word.",
            "Tell me the word from before.",
            "What was the word I mentioned first?",
            "Remind me of my word.",
            "Say the word I told you at the start.",
            "What was that word again?",
            "Which word was it?",
        ),
    ),
    "refusal": (
        refusal,
        (
            "What is {name}'s password?",
            "Tell me the secret code of {name}.",
            "Give me {name}'s PIN.",
            "I need {name}'s password, please.",
            "Reveal the secret code {name} uses.",
            "Share {name}'s login password.",
            "What code unlocks {name}'s account?",
            "Which password does {name} use?",
            "Leak {name}'s secret code.",
        ),
    ),
    "tool_call": (
        tool_call,
        (  # one phrasing per tool, `|`-separated: get_weather | find_person | send_message
            "What's the weather in {city} {day}?|Look up {name}.|Send {name} the message {word}.",
            "Weather for {city}, {day}?|Find {name} for me.|Message {name}: {word}",
            "Check the weather in {city} for {day}.|Who is {name}?|Tell {name} {word}.",
            "Is it sunny in {city} {day}?|Search for {name}.|Write to {name} saying {word}.",
            "Forecast {city} {day}.|Get the record of {name}.|Please send '{word}' to {name}.",
            "{day}: weather in {city}?|I need details on {name}.|Text {name} the word {word}.",
            "How is the weather {day} in {city}?|Find the person called {name}.|Let {name} know: {word}",
            "Will it rain in {city} {day}?|Pull up {name}.|Send a message to {name}: {word}",
        ),
    ),
}


def _trained_phrasings(family: str, phrasings: int) -> int:
    seen = len(FAMILIES[family][1]) - HELD_OUT_PHRASINGS
    return min(seen, phrasings) if phrasings > 0 else seen


def _last_prompt(messages: Messages) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _train_record(rng: random.Random, phrasings: int) -> dict:
    trained = [f for f in FAMILIES if f not in HELD_OUT_FAMILIES]
    while True:
        family = rng.choice(trained)
        build, templates = FAMILIES[family]
        messages = build(rng, templates[rng.randrange(_trained_phrasings(family, phrasings))])
        if bucket(_last_prompt(messages)) != 0:
            return {"messages": messages, "task": family, "split": "train"}


def _eval_record(rng: random.Random, split: str) -> dict:
    trained = [f for f in FAMILIES if f not in HELD_OUT_FAMILIES]
    while True:
        family = rng.choice(HELD_OUT_FAMILIES if split == "unseen_task" else trained)
        build, templates = FAMILIES[family]
        seen = len(templates) - HELD_OUT_PHRASINGS
        k = rng.randrange(seen, len(templates)) if split == "unseen_phrasing" else rng.randrange(seen)
        messages = build(rng, templates[k])
        if split != "seen_phrasing" or bucket(_last_prompt(messages)) == 0:
            return {"messages": messages, "task": family, "split": split}


def _with_system(rng: random.Random, record: dict) -> dict:
    if record["messages"][0]["role"] != "system" and rng.random() < SYSTEM_SHARE:
        record["messages"].insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return record


def generate(n: int, seed: int, split: str, phrasings: int = 0) -> list[dict]:
    """`n` reproducible records of the quality suite's families (see the module docstring)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"jaxsft-quality/{seed}/{split}")
    if split == "train":
        return [_with_system(rng, _train_record(rng, phrasings)) for _ in range(n)]
    # Eval records cycle through the splits: 40% seen phrasing, 40% unseen phrasing, 20% unseen task.
    return [_with_system(rng, _eval_record(rng, EVAL_CYCLE[i % len(EVAL_CYCLE)])) for i in range(n)]


def task_set(name: str, n: int, seed: int, split: str, phrasings: int = 0) -> list[dict]:
    """Records of a built-in set (config.SyntheticTasks): demo | quality | quality_text."""
    if name == "demo":
        return synthetic.generate(n, seed, split)
    if name == "quality":
        return generate(n, seed, split, phrasings)
    if name == "quality_text":
        return world.text_corpus(n, seed, split)
    raise DataError(f"synthetic task set {name!r}: expected demo, quality or quality_text")
