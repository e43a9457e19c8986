"""Arithmetic word problems made in code, with a held-out split and a binary reward.

The reward reads the last integer of the reply: 1.0 when it equals the answer, else 0.0.
Small instruct models usually compute `a + b` correctly but bury it in rambling text that
ends on another number; RL teaches them to finish on the answer. The held-out split uses
number pairs that training never sees, so accuracy on it measures more than memorisation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

NAMES = ("Tom", "Anna", "Sam", "Lily", "Ben", "Mia", "Omar", "Zoe")
ITEMS = ("apples", "books", "coins", "pens", "cards", "eggs", "shells", "stamps")
TEMPLATES = (
    "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
    "{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
    "{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have?",
)
MAX_OPERAND = 10
_INTEGER = re.compile(r"-?\d+")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def is_held_out(a: int, b: int) -> bool:
    """About one pair in five belongs to the held-out split, by a fixed rule."""
    return (a * 7 + b * 3) % 5 == 0


def _make(rng: random.Random, held_out: bool) -> Problem:
    while True:
        a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        if is_held_out(a, b) == held_out:
            break
    question = rng.choice(TEMPLATES).format(
        name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b
    )
    return Problem(question, a + b)


def training_problems(seed: int) -> random.Random:
    return random.Random(seed)


def next_training_problem(rng: random.Random) -> Problem:
    return _make(rng, held_out=False)


def held_out_problems(count: int, seed: int = 20261203) -> list[Problem]:
    rng = random.Random(seed)
    return [_make(rng, held_out=True) for _ in range(count)]


def reward(reply: str, answer: int) -> float:
    numbers = _INTEGER.findall(reply)
    return 1.0 if numbers and int(numbers[-1]) == answer else 0.0
