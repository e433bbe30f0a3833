"""Scoring of the IQ test and the FLM-101B paper's numbers to compare against (its IQ tables).

A prediction is correct iff it equals the answer after whitespace normalisation (runs of whitespace collapse to one
space, ends stripped): no partial credit, no case folding. Accuracy is in %. A category's score is
the unweighted mean of its subtasks' accuracies, which is how the paper's category numbers relate to its subtask
numbers (checked in the tests). The paper reports symbolic mapping as two categories, SuperGLUE-IQ and CLUE-IQ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

PAPER_MODELS = ("FLM-101B", "GPT-3", "GLM-130B")


def _row(flm: float | None, gpt3: float | None, glm: float | None) -> dict[str, float | None]:
    return dict(zip(PAPER_MODELS, (flm, gpt3, glm), strict=True))


# Accuracy (%) per subtask and per category, as the paper gives them; None where it reports no number (GPT-3 was not
# run on CLUE). Of CLUE only the CLUE-IQ average is copied here, so the CLUE subtasks have no entry (NOT_COPIED:
# shown as "n/a"); their numbers are in the paper's table and wait to be copied.
paper_numbers: dict[str, dict[str, float | None]] = {
    "counting": _row(69.59, 82.43, 60.81),
    "replace_lowercase": _row(64.00, 80.67, 69.67),
    "replace_word": _row(95.67, 95.00, 84.00),
    "rule": _row(76.42, 86.03, 71.49),
    "head_tail": _row(52.00, 61.00, 38.00),
    "full_repeating": _row(79.00, 92.00, 70.00),
    "head_slicing": _row(63.00, 57.00, 51.00),
    "pattern": _row(64.67, 70.00, 53.00),
    "multi_key_retrieval": _row(89.00, 92.67, 77.67),
    "single_supporting_fact": _row(59.00, 78.33, 56.33),
    "two_supporting_facts": _row(32.33, 39.33, 26.67),
    "interference": _row(60.11, 70.11, 53.56),
    "boolq": _row(49.50, 50.84, 40.13),
    "wic": _row(50.33, 53.33, 48.67),
    "rte": _row(48.38, 48.38, 47.65),
    "wsc": _row(38.83, 37.86, 56.31),
    "symbolic_superglue": _row(46.76, 47.60, 48.19),
    "symbolic_clue": _row(42.07, None, 39.96),
}


NOT_COPIED = ("afqmc", "csl", "ocnli", "cluewsc2020")


def paper_cell(name: str, model: str) -> str:
    """The paper's number for a subtask or category as a table cell: "–" where the paper reports none, "n/a" where
    it is not copied here (NOT_COPIED), "" where the paper has no such subtask (local datasets)."""
    if name in NOT_COPIED:
        return "n/a"
    if name not in paper_numbers:
        return ""
    value = paper_numbers[name][model]
    return "–" if value is None else f"{value:.2f}"


def normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def accuracy(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Exact-match accuracy in %."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return 0.0
    return 100.0 * sum(map(exact_match, predictions, answers)) / len(answers)


def category_averages(accuracies: Mapping[str, float], categories: Mapping[str, str]) -> dict[str, float]:
    """Unweighted mean accuracy of the subtasks of each category, categories in first-seen order."""
    groups: dict[str, list[float]] = {}
    for subtask, acc in accuracies.items():
        groups.setdefault(categories[subtask], []).append(acc)
    return {cat: sum(accs) / len(accs) for cat, accs in groups.items()}
