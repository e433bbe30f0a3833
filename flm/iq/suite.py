"""Run the IQ test through a text-generation backend, score it, and report it beside the FLM-101B paper.

A backend is anything with `generate(prompts, max_tokens, stop) -> completions`; model backends wrap our generation
code, while `OracleBackend` (must score 100%) and `RandomBackend` (must score near chance) check the harness itself.
Every prompt's answer sits on the line after the cue, so the suite stops generation at the first newline (and cuts
there again, for backends that ignore `stop`).

Subtasks are named in snake_case (`counting`, `head_tail`, `boolq`, ...), suites by category (`rule`, `pattern`,
`interference`, `symbolic_superglue`, `symbolic_clue`, `symbolic_local`) plus `offline` (everything that needs no
network: the generated categories and the packaged symbolic-mapping sample) and `paper` (the paper's 17 subtasks).
Default item counts are the paper's where its percentages reveal them, else 300 (symbolic mapping: capped at the
dataset's size).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from flm.config import FLMConfigError
from flm.iq import interference, pattern, rule, symbolic
from flm.iq.items import Item
from flm.iq.scoring import PAPER_MODELS, accuracy, category_averages, exact_match, paper_cell, paper_numbers

STOP = ["\n"]


class Backend(Protocol):
    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]: ...


class OracleBackend:
    """Answers every prompt it was built with exactly: a harness that scores it below 100% is broken."""

    def __init__(self, answers: Mapping[str, str]):
        self.answers = dict(answers)

    @classmethod
    def from_items(cls, items: Iterable[Item]) -> OracleBackend:
        return cls({it.prompt: it.answer for it in items})

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        missing = sum(p not in self.answers for p in prompts)
        if missing:
            raise KeyError(f"OracleBackend has no answer for {missing} prompt(s): built from other items or seed?")
        return [self.answers[p] for p in prompts]


class RandomBackend:
    """A plausible guesser: one of the answers the prompt's demonstrations show, else a few words of the prompt.

    Its score is a floor to compare models against: chance among the shown labels for symbolic mapping (1/#labels),
    about zero where every answer is new (string transforms, counting, key retrieval).
    """

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        return [self._guess(p) for p in prompts]

    def _guess(self, prompt: str) -> str:
        *body, cue = prompt.split("\n")
        shown = [line[len(cue):].strip() for line in body if line.startswith(cue) and line != cue]
        if shown:
            return self.rng.choice(shown)
        return " ".join(self.rng.choices(prompt.split(), k=self.rng.randint(1, 3)))


@dataclass(frozen=True)
class Subtask:
    """A registered subtask: the paper's name for it, its category, default item count, and `build(n, seed)`."""

    title: str
    category: str
    n_items: int
    build: Callable[[int, int], list[Item]]


CATEGORIES = {
    "rule": "Rule understanding",
    "pattern": "Pattern mining",
    "interference": "Anti-interference",
    "symbolic_superglue": "SuperGLUE-IQ",
    "symbolic_clue": "CLUE-IQ",
    "symbolic_local": "Symbolic mapping (local data)",
}


def _symbolic(name: str, category: str, load: Callable[[], list[symbolic.Example]]) -> Callable[[int, int], list[Item]]:
    return lambda n, seed: symbolic.symbolic_items(load(), n, seed, subtask=name, category=category)


def _hub(name: str, category: str) -> Callable[[int, int], list[Item]]:
    return _symbolic(name, category, lambda: symbolic.load_hub(name))


SUBTASKS: dict[str, Subtask] = {
    "counting": Subtask("Counting", "rule", 148, rule.counting),
    "replace_lowercase": Subtask("Replace-Lowercase", "rule", 300, rule.replace_lowercase),
    "replace_word": Subtask("Replace-Word", "rule", 300, rule.replace_word),
    "head_tail": Subtask("Head & Tail", "pattern", 100, pattern.head_tail),
    "full_repeating": Subtask("Full Repeating", "pattern", 100, pattern.full_repeating),
    "head_slicing": Subtask("Head Slicing", "pattern", 100, pattern.head_slicing),
    "multi_key_retrieval": Subtask("Multiple Key Retrieval", "interference", 300, interference.multi_key_retrieval),
    "single_supporting_fact": Subtask("Single Supporting Fact", "interference", 300,
                                      interference.single_supporting_fact),
    "two_supporting_facts": Subtask("Two Supporting Facts", "interference", 300, interference.two_supporting_facts),
    **{name: Subtask(title, cat, 300, _hub(name, cat)) for name, title, cat in (
        ("boolq", "BoolQ", "symbolic_superglue"),
        ("wic", "WiC", "symbolic_superglue"),
        ("rte", "RTE", "symbolic_superglue"),
        ("wsc", "WSC", "symbolic_superglue"),
        ("afqmc", "AFQMC", "symbolic_clue"),
        ("csl", "CSL", "symbolic_clue"),
        ("ocnli", "OCNLI", "symbolic_clue"),
        ("cluewsc2020", "CLUEWSC2020", "symbolic_clue"),
    )},
    "symbolic_sample": Subtask("Topics (sample)", "symbolic_local", 300,
                               _symbolic("symbolic_sample", "symbolic_local",
                                         lambda: symbolic.load_jsonl(symbolic.SAMPLE))),
}
SUITES: dict[str, tuple[str, ...]] = {cat: tuple(n for n, s in SUBTASKS.items() if s.category == cat)
                                      for cat in CATEGORIES}
_GENERATED = SUITES["rule"] + SUITES["pattern"] + SUITES["interference"]
SUITES["offline"] = (*_GENERATED, "symbolic_sample")
SUITES["paper"] = (*_GENERATED, *SUITES["symbolic_superglue"], *SUITES["symbolic_clue"])


def _registry(data_files: Mapping[str, str | Path] | None) -> dict[str, Subtask]:
    """SUBTASKS with symbolic-mapping subtasks read from local JSONL: a known name is overridden, a new one added."""
    registry = dict(SUBTASKS)
    for name, path in (data_files or {}).items():
        known = SUBTASKS.get(name)
        if known and not known.category.startswith("symbolic"):
            raise FLMConfigError(f"data_files applies to symbolic-mapping subtasks only, not {name!r}")
        title, cat = (known.title, known.category) if known else (name, "symbolic_local")
        registry[name] = Subtask(title, cat, 300, _symbolic(name, cat, lambda p=path: symbolic.load_jsonl(p)))
    return registry


def resolve_subtasks(subtasks: str | Sequence[str], data_files: Mapping[str, str | Path] | None = None) -> list[str]:
    """Subtask names, in order and without repeats, from a mix of suite and subtask names."""
    registry = _registry(data_files)
    names: list[str] = []
    for name in [subtasks] if isinstance(subtasks, str) else subtasks:
        if name not in SUITES and name not in registry:
            raise FLMConfigError(f"unknown IQ suite or subtask {name!r}; suites: {', '.join(SUITES)}; "
                                 f"subtasks: {', '.join(registry)}")
        names += [n for n in SUITES.get(name, (name,)) if n not in names]
    return names


def build_items(subtasks: str | Sequence[str] = "offline", seed: int = 0, n_items: int | None = None,
                data_files: Mapping[str, str | Path] | None = None) -> dict[str, list[Item]]:
    """The items of every selected subtask (`n_items` each, else the subtask's default), keyed by subtask."""
    if n_items is not None and n_items < 1:
        raise FLMConfigError(f"n_items must be at least 1, got {n_items}")
    registry = _registry(data_files)
    return {name: registry[name].build(n_items or registry[name].n_items, seed)
            for name in resolve_subtasks(subtasks, data_files)}


class SubtaskResult(BaseModel):
    name: str
    title: str
    category: str
    n_items: int
    n_correct: int
    accuracy: float
    answers: list[str]
    predictions: list[str]
    prompt_tokens_kept: int | None = None  # a longer prompt lost its start (the model's context); None: no limit


class SuiteResult(BaseModel):
    backend: str
    seed: int
    subtasks: list[SubtaskResult]
    categories: dict[str, float]  # category -> unweighted mean of its subtasks' accuracies


def _cut(text: str, stop: list[str]) -> str:
    for s in stop:
        text = text.split(s, 1)[0]
    return text


def run_suite(backend: Backend, subtasks: str | Sequence[str] = "offline", seed: int = 0, n_items: int | None = None,
              data_files: Mapping[str, str | Path] | None = None, batch_size: int = 32,
              progress: bool = True) -> SuiteResult:
    """Score `backend` on the selected subtasks; all items are built first, so a missing dataset fails at once."""
    registry = _registry(data_files)
    items = build_items(subtasks, seed, n_items, data_files)
    results = []
    with Progress(disable=not progress) as bar:
        for name, its in items.items():
            task = bar.add_task(name, total=len(its))
            max_tokens = max(len(it.answer) for it in its) + 16  # characters bound tokens for our ASCII answers
            kept = getattr(backend, "kept_prompt_tokens", None)
            predictions: list[str] = []
            for i in range(0, len(its), batch_size):
                batch = [it.prompt for it in its[i:i + batch_size]]
                predictions += [_cut(out, STOP) for out in backend.generate(batch, max_tokens, STOP)]
                bar.advance(task, len(batch))
            answers = [it.answer for it in its]
            sub = registry[name]
            results.append(SubtaskResult(
                name=name, title=sub.title, category=sub.category, n_items=len(its),
                n_correct=sum(map(exact_match, predictions, answers)),
                accuracy=accuracy(predictions, answers), answers=answers, predictions=predictions,
                prompt_tokens_kept=kept(max_tokens) if kept else None))
    categories = category_averages({r.name: r.accuracy for r in results}, {r.name: r.category for r in results})
    return SuiteResult(backend=type(backend).__name__, seed=seed, subtasks=results, categories=categories)


def print_result(result: SuiteResult, console: Console | None = None) -> None:
    """Our accuracy beside the paper's three models, subtask by subtask, with each category's average."""
    table = Table(title=f"IQ test: {result.backend}, seed {result.seed}",
                  caption="paper: – none reported; n/a not copied here (CLUE per subtask)")
    for col in ("category", "subtask", "n", "ours", *PAPER_MODELS):
        table.add_column(col, justify="left" if col in ("category", "subtask") else "right")
    for cat, avg in result.categories.items():
        for i, r in enumerate(r for r in result.subtasks if r.category == cat):
            table.add_row("" if i else CATEGORIES.get(cat, cat), r.title, str(r.n_items), f"{r.accuracy:.2f}",
                          *(paper_cell(r.name, m) for m in PAPER_MODELS))
        table.add_row("", "[b]average[/b]", "", f"[b]{avg:.2f}[/b]", *(paper_cell(cat, m) for m in PAPER_MODELS),
                      end_section=True)
    (console or Console()).print(table)
    cut = [f"{r.name} {r.prompt_tokens_kept}" for r in result.subtasks if r.prompt_tokens_kept is not None]
    if cut:
        (console or Console()).print(f"prompts longer than the model's context allows were cut from the left to "
                                     f"their last N tokens: {', '.join(cut)}")


def plot_result(result: SuiteResult, path: str | Path) -> Path:
    """A grouped bar chart (PNG): per subtask and per category, our bars beside the paper's (missing ones omitted)."""
    from matplotlib.figure import Figure  # renders through Agg without touching pyplot's global state

    panels = [("subtask", [(r.title, r.name, r.accuracy) for r in result.subtasks]),
              ("category", [(CATEGORIES.get(c, c), c, acc) for c, acc in result.categories.items()])]
    series = [f"ours ({result.backend})", *PAPER_MODELS]
    fig = Figure(figsize=(max(8.0, 0.9 * len(result.subtasks)), 8), layout="constrained")
    width = 0.8 / len(series)
    for ax, (kind, rows) in zip(fig.subplots(2, 1), panels, strict=True):
        for j, label in enumerate(series):
            xs, ys = [], []
            for i, (_, key, ours) in enumerate(rows):
                value = ours if j == 0 else paper_numbers.get(key, {}).get(label)
                if value is not None:
                    xs.append(i + (j - (len(series) - 1) / 2) * width)
                    ys.append(value)
            ax.bar(xs, ys, width, label=label)
        ax.set_xticks(range(len(rows)), [title for title, _, _ in rows], rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"IQ test per {kind}")
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=len(series))
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def save_result(result: SuiteResult, out_dir: str | Path) -> tuple[Path, Path]:
    """`iq.json` (the full result) and `iq.png` (the chart) in `out_dir`; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "iq.json").write_text(result.model_dump_json(indent=2) + "\n")
    return out / "iq.json", plot_result(result, out / "iq.png")
