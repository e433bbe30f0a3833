"""Symbolic mapping: in-context classification whose labels are replaced by meaningless symbols.

Any labelled dataset (a list of `Example(texts, label)`) becomes the IQ task: for each query example, every label
gets a fresh random symbol (4 lowercase letters/digits with at least one digit, distinct, and appearing nowhere else
in the prompt, so no prior knowledge of the label word helps); `shots_per_label` demonstrations of each label are
drawn from the other examples (never one with the query's text), shuffled, and shown as
"Input: text / Label: symbol" blocks (multi-text examples as "Input 1: / Input 2: ..."); the answer is the query's
symbol. Queries are the first n examples of a seeded shuffle, so n above the dataset's size gives every example once.

Sources: SuperGLUE BoolQ/WiC/RTE/WSC and CLUE AFQMC/CSL/OCNLI/CLUEWSC2020 validation splits from the Hugging Face
hub through `datasets` (reachability is probed with a 10 s timeout first, so an offline machine gets an error at
once, not a hang), or any local JSONL of {"text": str} / {"texts": [str, ...]} plus "label" (`load_jsonl`).
`flm/iq/data/topics.jsonl` is a small topic-classification sample (48 sentences: sport/food/weather) we wrote for
tests and offline runs.
"""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict

from flm.config import FLMConfigError
from flm.iq.items import Item, item_rng

SAMPLE = Path(__file__).parent / "data" / "topics.jsonl"


class Example(BaseModel):
    """One labelled example; `texts` holds one entry per input field (a premise and a hypothesis, ...)."""

    model_config = ConfigDict(frozen=True)

    texts: tuple[str, ...]
    label: str


class HubSource(NamedTuple):
    repo: str
    config: str
    fields: tuple[str, ...]  # dotted paths into a row; list values are joined with ", "


HUB_SOURCES = {
    "boolq": HubSource("aps/super_glue", "boolq", ("passage", "question")),
    "wic": HubSource("aps/super_glue", "wic", ("word", "sentence1", "sentence2")),
    "rte": HubSource("aps/super_glue", "rte", ("premise", "hypothesis")),
    "wsc": HubSource("aps/super_glue", "wsc.fixed", ("text", "span1_text", "span2_text")),
    "afqmc": HubSource("clue/clue", "afqmc", ("sentence1", "sentence2")),
    "csl": HubSource("clue/clue", "csl", ("abst", "keyword")),
    "ocnli": HubSource("clue/clue", "ocnli", ("sentence1", "sentence2")),
    "cluewsc2020": HubSource("clue/clue", "cluewsc2020", ("text", "target.span1_text", "target.span2_text")),
}


def _example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise FLMConfigError(f"{where}: expected a JSON object with 'text' or 'texts' and 'label'")
    if row.get("label") is None:
        raise FLMConfigError(f"{where}: record has no 'label'")
    texts = row.get("texts", [row["text"]] if "text" in row else None)
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise FLMConfigError(f"{where}: record needs 'text' (a string) or 'texts' (a list of strings)")
    return Example(texts=tuple(texts), label=str(row["label"]))


def _check(examples: list[Example], where: str) -> list[Example]:
    if len({e.label for e in examples}) < 2:
        raise FLMConfigError(f"{where}: needs at least two distinct labels")
    return examples


def load_jsonl(path: str | Path) -> list[Example]:
    """Examples of a local JSONL file: one {"text" or "texts", "label"} object per line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FLMConfigError(f"symbolic-mapping data file {path} does not exist")
    examples = []
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FLMConfigError(f"{path}:{no}: not valid JSON ({e.msg})") from None
            examples.append(_example(row, f"{path}:{no}"))
    return _check(examples, str(path))


def _field(row: dict, path: str) -> str:
    for key in path.split("."):
        row = row[key]
    return ", ".join(row) if isinstance(row, list) else str(row)


def load_hub(name: str) -> list[Example]:
    """The validation split of a SuperGLUE/CLUE task; fails fast with a one-line error when the hub is unreachable."""
    src = HUB_SOURCES[name]
    hint = f"pass a local JSONL instead (data_files={{'{name}': PATH}})"
    if any(os.environ.get(v, "0").lower() not in ("", "0", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise FLMConfigError(f"{name} needs the Hugging Face hub but HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; {hint}")
    import datasets
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(src.repo, timeout=10)
        rows = datasets.load_dataset(src.repo, src.config, split="validation")
        examples = [Example(texts=tuple(_field(r, f) for f in src.fields), label=str(r["label"]))
                    for r in rows if r["label"] is not None and r["label"] >= 0]  # CLUE marks unlabelled rows -1
    except Exception as e:
        why = f"{type(e).__name__}: {next(iter(str(e).strip().splitlines()), '')}"
        raise FLMConfigError(f"cannot load {name} ({src.repo}/{src.config}) from the Hugging Face hub: {why}; "
                             f"{hint}") from None
    return _check(examples, f"{src.repo}/{src.config}")


def _block(texts: tuple[str, ...], symbol: str) -> str:
    clean = [" ".join(t.split()) for t in texts]  # one line per field keeps the block structure parseable
    lines = [f"Input: {clean[0]}"] if len(clean) == 1 else [f"Input {i}: {t}" for i, t in enumerate(clean, 1)]
    return "\n".join([*lines, f"Label: {symbol}".rstrip()])


def _symbols(r: random.Random, labels: list[str], taken: str) -> dict[str, str]:
    """A fresh symbol per label: unseen in `taken` (the prompt's text, lowercased) and unlike any label word."""
    out: dict[str, str] = {}
    while len(out) < len(labels):
        s = "".join(r.choices(string.ascii_lowercase + string.digits, k=4))
        if any(c.isdigit() for c in s) and s not in taken and s not in out.values():
            out[labels[len(out)]] = s
    return out


def symbolic_items(examples: list[Example], n: int, seed: int, subtask: str, category: str,
                   shots_per_label: int = 2) -> list[Item]:
    """n symbol-label items over `examples` (as the module docstring describes); min(n, len(examples)) in all."""
    rng = item_rng(subtask, seed)
    labels = sorted({e.label for e in examples})
    order = rng.sample(examples, len(examples))
    items = []
    for query in order[:n]:
        pool = {lab: [e for e in examples if e.label == lab and e.texts != query.texts] for lab in labels}
        short = [lab for lab, p in pool.items() if len(p) < shots_per_label]
        if short:
            raise FLMConfigError(f"{subtask}: label {short[0]!r} has fewer than {shots_per_label} examples to "
                                 "demonstrate besides the query")
        demos = [e for lab in labels for e in rng.sample(pool[lab], shots_per_label)]
        rng.shuffle(demos)
        taken = " ".join(t for e in [*demos, query] for t in e.texts).lower() + " " + " ".join(labels).lower()
        symbols = _symbols(rng, labels, taken)
        prompt = "\n\n".join([*(_block(e.texts, symbols[e.label]) for e in demos), _block(query.texts, "")])
        items.append(Item(subtask=subtask, category=category, prompt=prompt, answer=symbols[query.label],
                          meta={"label": query.label, "symbols": symbols, "texts": list(query.texts)}))
    return items
