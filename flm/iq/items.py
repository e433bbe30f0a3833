"""IQ-test items and the shared machinery of their seeded generators.

An `Item` is one prompt, the one exact answer it admits, and the facts it was built from (`meta`: the rule, the
query input, the symbol table, ...), so failures can be analysed and tests can check answers without trusting the
generator. Each category module (`rule`, `pattern`, `interference`, `symbolic`) builds items as a pure function of
(n, seed, difficulty knobs): its `random.Random` is seeded with a string naming the subtask and the seed, and string
seeds are hashed with SHA-512, so the same seed gives identical items on every platform and PYTHONHASHSEED.

Few-shot prompts are blocks separated by a blank line: an optional instruction, the demonstrations, then the query,
whose last line is the answer cue (`Output:`, `Answer:`, `Label:`); the answer is what follows the cue on that line.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flm.config import FLMConfigError

Pair = tuple[str, str]


class Item(BaseModel):
    """One test question; a prediction is correct iff it equals `answer` after whitespace normalisation."""

    model_config = ConfigDict(frozen=True)

    subtask: str
    category: str
    prompt: str
    answer: str
    meta: dict[str, Any] = Field(default_factory=dict)


def item_rng(subtask: str, seed: int) -> random.Random:
    """The generator's randomness: one stream per (subtask, seed), independent of the other subtasks."""
    return random.Random(f"flm-iq/{subtask}/{seed}")


def few_shot(demos: list[Pair], query: str, instruction: str = "") -> str:
    """`instruction`, then one `Input: x / Output: y` block per demonstration, then the query ending in `Output:`."""
    blocks = [f"Input: {x}\nOutput: {y}" for x, y in demos] + [f"Input: {query}\nOutput:"]
    return "\n\n".join([instruction, *blocks] if instruction else blocks)


def draw_demos(rng: random.Random, make: Callable[[random.Random], Pair], query: Pair, k: int,
               distinct_outputs: bool = True) -> list[Pair]:
    """k demonstrations from `make`, none with the query's input (nor, if `distinct_outputs`, its answer).

    Demonstrations are also pairwise distinct, so k shots really are k examples of the rule. A rule whose outputs
    are the answer itself (string transforms) must not show the answer; a question-answering task may repeat an
    answer (two stories can end in the same room) but never the query's story.
    """
    demos, inputs, outputs = [], {query[0]}, {query[1]}
    for _ in range(200 * k):
        if len(demos) == k:
            break
        x, y = make(rng)
        if x in inputs or (distinct_outputs and y in outputs):
            continue
        demos.append((x, y))
        inputs.add(x)
        outputs.add(y)
    if len(demos) < k:
        raise FLMConfigError(f"cannot draw {k} demonstrations distinct from the query: make the items longer")
    return demos
