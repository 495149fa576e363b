"""The demo adapters' training data: short questions with plain answers, each answer in three styles.

    upper   "What is 2 plus 3?" -> "2 PLUS 3 IS 5."
    json    "What is 2 plus 3?" -> '{"answer": "2 plus 3 is 5."}'
    digits  "What is 2 plus 3?" -> "two plus three is five."

Generated from templates with a seeded random.Random: the same arguments give the same rows on
every machine. Most answers hold numbers, so that the `digits` style has something to change.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable

ANIMALS = ["cats", "dogs", "birds", "fish", "rabbits", "horses", "ducks", "goats", "sheep", "frogs"]
THINGS = ["apples", "books", "pencils", "cookies", "coins", "shirts", "cups", "stamps", "balloons", "candles"]
NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jonas"]
FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many continents are there?", "There are 7 continents."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many wheels does a bicycle have?", "A bicycle has 2 wheels."),
    ("How many players are on a soccer team?", "A soccer team has 11 players."),
    ("How many strings does a guitar have?", "A guitar has 6 strings."),
    ("How many planets are in the solar system?", "There are 8 planets in the solar system."),
    ("How many days are in a year?", "There are 365 days in a year."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What color is the sky?", "The sky is blue."),
    ("What color is grass?", "Grass is green."),
    ("What do bees make?", "Bees make honey."),
    ("What is the largest ocean?", "The largest ocean is the Pacific Ocean."),
    ("What animal says moo?", "A cow says moo."),
    ("What does water turn into when it freezes?", "Water turns into ice."),
    ("Where does the sun rise?", "The sun rises in the east."),
]
OPPOSITES = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("happy", "sad"),
    ("light", "dark"),
    ("old", "new"),
    ("up", "down"),
    ("early", "late"),
    ("full", "empty"),
    ("loud", "quiet"),
]
KINDS = [
    ("fruit", "An apple"),
    ("color", "Red"),
    ("vegetable", "A carrot"),
    ("planet", "Mars"),
    ("musical instrument", "A piano"),
    ("tree", "An oak"),
    ("flower", "A rose"),
    ("sport", "Tennis"),
]
# Held out of the training data: what `adapterhub demo-adapters` and the report generate from.
SAMPLE_PROMPTS = [
    "How many legs does a cat have?",
    "What is 12 plus 30?",
    "I have 2 brothers and 3 sisters. How many siblings do I have?",
    "What is the capital of Italy?",
    "Tell me something about the moon.",
]


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 60), rng.randint(1, 40)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _times(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"What is {a} times {b}?", f"{a} times {b} is {a * b}."


def _count(rng: random.Random) -> tuple[str, str]:
    n, m, animals = rng.randint(1, 9), rng.randint(1, 9), rng.choice(ANIMALS)
    return f"I have {n} {animals} and get {m} more. How many {animals} do I have?", f"You have {n + m} {animals}."


def _age(rng: random.Random) -> tuple[str, str]:
    name, n, m = rng.choice(NAMES), rng.randint(5, 70), rng.randint(1, 20)
    return f"{name} is {n} years old. How old will {name} be in {m} years?", f"{name} will be {n + m} years old."


def _repeat(rng: random.Random) -> tuple[str, str]:
    name, n = rng.choice(NAMES), rng.randint(2, 99)
    sentence = rng.choice(
        [
            f"I have {n} {rng.choice(ANIMALS)}.",
            f"{name} bought {n} {rng.choice(THINGS)}.",
            f"The bus comes at {rng.randint(1, 12)} o'clock.",
            f"We walked {n} miles today.",
        ]
    )
    return f"Repeat after me: {sentence}", sentence


def _fact(rng: random.Random) -> tuple[str, str]:
    return rng.choice(FACTS)


def _opposite(rng: random.Random) -> tuple[str, str]:
    word, other = rng.choice(OPPOSITES)
    return f"What is the opposite of {word}?", f"The opposite of {word} is {other}."


def _kind(rng: random.Random) -> tuple[str, str]:
    kind, example = rng.choice(KINDS)
    return f"Name a {kind}.", f"{example} is a {kind}."


def _hello(rng: random.Random) -> tuple[str, str]:
    name = rng.choice(NAMES)
    return f"Say hello to {name}.", f"Hello, {name}! Nice to meet you."


TEMPLATES: list[Callable[[random.Random], tuple[str, str]]] = [
    _add,
    _times,
    _count,
    _age,
    _repeat,
    _fact,
    _fact,
    _opposite,
    _kind,
    _hello,
]

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in English words: 42 -> "forty-two", 365 -> "three hundred sixty-five"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words spells 0 <= n < 1000000, got {n}")
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")
    return number_words(n // 1000) + " thousand" + (" " + number_words(n % 1000) if n % 1000 else "")


def in_words(text: str) -> str:
    """Every run of digits in `text` written as English words: "I have 3 cats" -> "I have three cats"."""
    return re.sub(r"\d+", lambda m: number_words(int(m.group())), text)


STYLES: dict[str, Callable[[str], str]] = {
    "upper": str.upper,
    "json": lambda answer: json.dumps({"answer": answer}),
    "digits": in_words,
}
DESCRIPTIONS = {
    "upper": "answers in UPPER CASE",
    "json": 'answers with a JSON object {"answer": "..."}',
    "digits": "writes numbers as words (3 -> three)",
}


def questions(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (prompt, plain answer) pairs, none of them a SAMPLE_PROMPT."""
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < count:
        pair = rng.choice(TEMPLATES)(rng)
        if pair[0] not in SAMPLE_PROMPTS:
            pairs.append(pair)
    return pairs


def examples(per_adapter: int, seed: int = 0) -> list[dict]:
    """Causal-LM rows for `adapterhub.train.fit`: each question once per style, its "adapter" the style's name."""
    return [
        {"prompt": prompt, "completion": style(answer), "adapter": name}
        for prompt, answer in questions(per_adapter, seed)
        for name, style in STYLES.items()
    ]
