"""The IQ-test harness: oracle scores 100%, random scores near chance, bad input fails with one clear line."""

import json

import huggingface_hub
import pytest
from rich.console import Console

from flm.config import FLMConfigError
from flm.iq import symbolic
from flm.iq.scoring import accuracy, exact_match
from flm.iq.suite import (
    SUITES,
    OracleBackend,
    RandomBackend,
    SuiteResult,
    build_items,
    print_result,
    resolve_subtasks,
    run_suite,
    save_result,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def pairs(tmp_path):
    """A local two-field, two-label dataset under a new subtask name."""
    rows = [{"texts": [f"sentence {i}", f"other {i * 7}"], "label": "yes" if i % 3 else "no"} for i in range(30)]
    return {"pairs": write_jsonl(tmp_path / "pairs.jsonl", rows)}


def test_oracle_scores_100_on_every_subtask(pairs):
    names = [*SUITES["offline"], "pairs"]
    items = build_items(names, seed=3, data_files=pairs)
    result = run_suite(OracleBackend.from_items(i for its in items.values() for i in its), names, seed=3,
                       data_files=pairs, progress=False)
    assert [r.name for r in result.subtasks] == names
    assert all(r.accuracy == 100.0 and r.n_correct == r.n_items for r in result.subtasks)
    assert set(result.categories) == {"rule", "pattern", "interference", "symbolic_local"}
    assert all(v == 100.0 for v in result.categories.values())


def test_random_backend_scores_near_chance():
    """Bounds: 0-5% where every answer is new, <= 25% for the bAbI tasks (a guess among the 2 demo answers, places
    drawn from 8), <= chance + 20 points for symbolic mapping (3 labels: 33%; ~3 sigma at 48 items)."""
    result = run_suite(RandomBackend(seed=0), "offline", seed=0, progress=False)
    acc = {r.name: r.accuracy for r in result.subtasks}
    for name in SUITES["rule"] + SUITES["pattern"] + ("multi_key_retrieval",):
        assert acc[name] <= 5.0, name
    assert 2.0 <= acc["single_supporting_fact"] <= 25.0 and 2.0 <= acc["two_supporting_facts"] <= 25.0
    assert 100 / 3 - 20 <= acc["symbolic_sample"] <= 100 / 3 + 20


def test_whitespace_normalisation_and_stop():
    assert exact_match("  a  b\t", "a b") and not exact_match("A b", "a b")
    assert accuracy(["x", " y ", "z"], ["x", "y", "q"]) == pytest.approx(200 / 3)

    class Chatty(OracleBackend):  # a backend that ignores `stop` and pads its answers
        def generate(self, prompts, max_tokens, stop):
            return [f"  {a}\nInput: more" for a in super().generate(prompts, max_tokens, stop)]

    items = build_items("pattern", seed=1, n_items=10)
    result = run_suite(Chatty.from_items(i for its in items.values() for i in its), "pattern", seed=1, n_items=10,
                       progress=False)
    assert result.categories == {"pattern": 100.0}


def test_save_and_print(tmp_path):
    result = run_suite(RandomBackend(1), ["counting", "symbolic_sample"], n_items=8, progress=False)
    json_path, png_path = save_result(result, tmp_path / "out")
    assert SuiteResult.model_validate_json(json_path.read_text()) == result
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=160)
    print_result(result, console)
    text = console.export_text()
    assert "Counting" in text and "69.59" in text and "Topics (sample)" in text


def one_line_error(fn, *words):
    with pytest.raises(FLMConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_names_and_sizes():
    one_line_error(lambda: resolve_subtasks("nope"), "'nope'", "suites:", "offline")
    one_line_error(lambda: run_suite(RandomBackend(), ["rule", "countin"], progress=False), "'countin'")
    one_line_error(lambda: build_items("rule", n_items=0), "n_items")
    one_line_error(lambda: build_items("rule", data_files={"counting": "x.jsonl"}), "'counting'")


def test_bad_dataset_files(tmp_path):
    def load(rows, name="bad.jsonl"):
        path = tmp_path / name
        path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
        return lambda: build_items("mine", data_files={"mine": path})

    one_line_error(load([{"text": "a", "label": 0}, {"text": "b"}]), "bad.jsonl:2", "no 'label'")
    one_line_error(load([{"text": "a", "label": 0}, {"label": 1}]), "bad.jsonl:2", "'text'")
    one_line_error(load([{"texts": ["a", 3], "label": 0}]), "bad.jsonl:1", "'texts'")
    one_line_error(load(["{oops\n"]), "bad.jsonl:1", "not valid JSON")
    one_line_error(load([{"text": "a", "label": 0}, {"text": "b", "label": 0}]), "two distinct labels")
    one_line_error(load([{"text": "a", "label": 0}, {"text": "b", "label": 1}]), "fewer than 2 examples")
    one_line_error(lambda: symbolic.load_jsonl(tmp_path / "missing.jsonl"), "missing.jsonl", "does not exist")


def test_hub_unreachable_fails_fast(monkeypatch):
    def unreachable(*args, **kwargs):
        raise OSError("Could not resolve host: huggingface.co")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    one_line_error(lambda: run_suite(RandomBackend(), "symbolic_superglue", progress=False),
                   "boolq", "aps/super_glue", "Could not resolve host", "data_files")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    one_line_error(lambda: build_items("cluewsc2020"), "cluewsc2020", "HF_HUB_OFFLINE", "data_files")
