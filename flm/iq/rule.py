"""Rule understanding: follow a rule that the prompt states in words.

- Counting (0-shot): "Count from A to B in steps of S. Write the numbers separated by commas." The answer is the
  arithmetic sequence A, A±S, ..., B (length in [min_len, max_len], S in [1, max_step], smallest term in [0, 99],
  counting down with probability 1/2). We chose "count from A to B" over "count the occurrences" because it tests
  following an instruction rather than perception, and its answer is unambiguous.
- Replace-Lowercase (4-shot): 'Replace every "x" with "y".' over random lowercase strings (length in
  [min_len, max_len]) holding 1..max_hits copies of x; the answer is the query string with every x replaced by y.
- Replace-Word (4-shot): 'Replace every word "w" with "v".' over random sentences of common words (word count in
  [min_len, max_len]) holding 1..max_hits copies of w; neither w nor v otherwise occurs, so the rule is unambiguous.

Each item draws its own rule; demonstrations use the same rule on other strings, never the query's string nor its
answer. The paper's item counts (our defaults in the suite): Counting 148 (its percentages are multiples of 1/148),
Replace-Lowercase and Replace-Word 300.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from flm.iq.items import Item, draw_demos, few_shot, item_rng

WORDS = (
    "apple", "river", "stone", "cloud", "green", "table", "window", "music", "paper", "light", "smile", "winter",
    "garden", "bread", "silver", "ocean", "forest", "happy", "quiet", "yellow", "market", "letter", "candle",
    "mirror", "pencil", "summer", "bridge", "dragon", "castle", "rocket", "tiger", "orange", "planet", "friend",
    "school", "doctor", "engine", "violin", "basket", "island", "jacket", "ladder", "monkey", "needle", "pepper",
    "rabbit", "saddle", "tunnel", "wallet", "zebra", "anchor", "butter", "copper", "desert", "feather", "hammer",
    "lemon", "meadow",
)


def counting(n: int, seed: int, min_len: int = 3, max_len: int = 12, max_step: int = 3) -> list[Item]:
    rng = item_rng("counting", seed)
    items = []
    for _ in range(n):
        length, step, low = rng.randint(min_len, max_len), rng.randint(1, max_step), rng.randint(0, 99)
        numbers = [low + step * i for i in range(length)]
        if rng.random() < 0.5:
            numbers.reverse()
        prompt = (f"Count from {numbers[0]} to {numbers[-1]} in steps of {step}. "
                  "Write the numbers separated by commas.\nAnswer:")
        items.append(Item(subtask="counting", category="rule", prompt=prompt, answer=", ".join(map(str, numbers)),
                          meta={"start": numbers[0], "end": numbers[-1], "step": step}))
    return items


def _replacement_items(subtask: str, n: int, seed: int, shots: int, pick_rule: Callable[[random.Random], list[str]],
                       make_input: Callable[[random.Random, str, str], list[str]], instruction: str,
                       sep: str) -> list[Item]:
    """Shared body of the two string-replacement subtasks: one rule (src -> dst) per item, shown on `shots` demos."""
    rng = item_rng(subtask, seed)
    items = []
    for _ in range(n):
        src, dst = pick_rule(rng)

        def make(r: random.Random, src=src, dst=dst) -> tuple[str, str]:
            tokens = make_input(r, src, dst)
            return sep.join(tokens), sep.join(dst if t == src else t for t in tokens)

        query = make(rng)
        demos = draw_demos(rng, make, query, shots)
        prompt = few_shot(demos, query[0], instruction.format(src=src, dst=dst))
        items.append(Item(subtask=subtask, category="rule", prompt=prompt, answer=query[1],
                          meta={"src": src, "dst": dst, "query": query[0]}))
    return items


def _with_hits(r: random.Random, fillers: list[str], src: str, min_len: int, max_len: int, max_hits: int) -> list[str]:
    """A random token list of length in [min_len, max_len] with 1..max_hits copies of `src` and fillers elsewhere."""
    length = r.randint(min_len, max_len)
    tokens = [r.choice(fillers) for _ in range(length)]
    for i in r.sample(range(length), r.randint(1, min(max_hits, length))):
        tokens[i] = src
    return tokens


def replace_lowercase(n: int, seed: int, shots: int = 4, min_len: int = 6, max_len: int = 12,
                      max_hits: int = 3) -> list[Item]:
    def make_input(r: random.Random, src: str, dst: str) -> list[str]:
        return _with_hits(r, [c for c in string.ascii_lowercase if c != src], src, min_len, max_len, max_hits)

    return _replacement_items("replace_lowercase", n, seed, shots, lambda r: r.sample(string.ascii_lowercase, 2),
                              make_input, 'Replace every "{src}" with "{dst}".', sep="")


def replace_word(n: int, seed: int, shots: int = 4, min_len: int = 5, max_len: int = 10,
                 max_hits: int = 2) -> list[Item]:
    def make_input(r: random.Random, src: str, dst: str) -> list[str]:
        return _with_hits(r, [w for w in WORDS if w not in (src, dst)], src, min_len, max_len, max_hits)

    return _replacement_items("replace_word", n, seed, shots, lambda r: r.sample(WORDS, 2),
                              make_input, 'Replace every word "{src}" with "{dst}".', sep=" ")
