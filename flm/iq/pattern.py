"""Pattern mining: induce an unstated transformation from 5 demonstrations and apply it to the query.

Inputs are space-separated random lowercase letters, length in [min_len, max_len]; each item draws its own hidden
parameters, shared by its demonstrations and its query.
- Head & Tail: wrap the input in a fixed head and tail token (two random uppercase letters, so they stand out):
  "a b c" -> "Q a b c Z".
- Full Repeating: the input written `times` times: "a b c" -> "a b c a b c".
- Head Slicing: the first k tokens of the input, k in [1, max_head]; inputs are longer than max_head:
  "a b c d" -> "a b".
No demonstration has the query's input or the query's answer (for Head Slicing: demos never start like the query),
so the answer cannot be copied from the prompt. The paper uses 100 items per subtask.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from flm.iq.items import Item, draw_demos, few_shot, item_rng

Transform = Callable[[list[str]], list[str]]


def _pattern_items(subtask: str, n: int, seed: int, shots: int, min_len: int, max_len: int,
                   draw_rule: Callable[[random.Random], tuple[dict, Transform]]) -> list[Item]:
    """`draw_rule(rng)` -> (meta, transform) for one item; its demonstrations and query share that rule."""
    rng = item_rng(subtask, seed)
    items = []
    for _ in range(n):
        meta, transform = draw_rule(rng)

        def make(r: random.Random, transform=transform) -> tuple[str, str]:
            tokens = [r.choice(string.ascii_lowercase) for _ in range(r.randint(min_len, max_len))]
            return " ".join(tokens), " ".join(transform(tokens))

        query = make(rng)
        demos = draw_demos(rng, make, query, shots)
        items.append(Item(subtask=subtask, category="pattern", prompt=few_shot(demos, query[0]), answer=query[1],
                          meta={**meta, "query": query[0]}))
    return items


def head_tail(n: int, seed: int, shots: int = 5, min_len: int = 3, max_len: int = 8) -> list[Item]:
    def draw_rule(r: random.Random) -> tuple[dict, Transform]:
        head, tail = r.choice(string.ascii_uppercase), r.choice(string.ascii_uppercase)
        return {"head": head, "tail": tail}, lambda t: [head, *t, tail]

    return _pattern_items("head_tail", n, seed, shots, min_len, max_len, draw_rule)


def full_repeating(n: int, seed: int, shots: int = 5, min_len: int = 3, max_len: int = 8,
                   times: int = 2) -> list[Item]:
    return _pattern_items("full_repeating", n, seed, shots, min_len, max_len,
                          lambda r: ({"times": times}, lambda t: t * times))


def head_slicing(n: int, seed: int, shots: int = 5, min_len: int = 4, max_len: int = 8,
                 max_head: int = 3) -> list[Item]:
    def draw_rule(r: random.Random) -> tuple[dict, Transform]:
        k = r.randint(1, max_head)
        return {"k": k}, lambda t: t[:k]

    return _pattern_items("head_slicing", n, seed, shots, max(min_len, max_head + 1), max(max_len, max_head + 1),
                          draw_rule)
