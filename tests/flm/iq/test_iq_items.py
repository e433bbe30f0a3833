"""IQ-test items: reproducible by seed, answers right by a second implementation, demonstrations never leak."""

import json
import re

import pytest

from flm.iq import symbolic
from flm.iq.scoring import PAPER_MODELS, category_averages, paper_numbers
from flm.iq.suite import SUBTASKS, SUITES, build_items

OFFLINE = SUITES["offline"]


@pytest.fixture(scope="module")
def items():
    """Every offline subtask at its default (paper) size."""
    return build_items("offline", seed=0)


def blocks(prompt: str) -> tuple[list[str], str]:
    """(demonstration blocks, query block) of a prompt; an instruction block (no cue) is dropped."""
    *first, query = prompt.split("\n\n")
    cue = query.split("\n")[-1]
    return [b for b in first if b.split("\n")[-1].startswith(cue)], query


def body(block: str) -> str:
    """A block without its answer line."""
    return block.rsplit("\n", 1)[0]


def answer_line(block: str) -> str:
    return block.rsplit("\n", 1)[1].split(":", 1)[1].strip()


def query_input(prompt: str) -> str:
    return body(blocks(prompt)[1]).removeprefix("Input: ")


def demo_pairs(prompt: str) -> list[tuple[str, str]]:
    return [(body(b).removeprefix("Input: "), answer_line(b)) for b in blocks(prompt)[0]]


# ---- independent solvers: each recomputes the answer from the prompt alone ----

def solve_counting(prompt):
    a, b, s = map(int, re.search(r"Count from (\d+) to (\d+) in steps of (\d+)\.", prompt).groups())
    return ", ".join(str(x) for x in range(a, b + (1 if b >= a else -1), s if b >= a else -s))


def solve_replace_lowercase(prompt):
    src, dst = re.match(r'Replace every "([a-z])" with "([a-z])"\.', prompt).groups()
    return "".join(dst if c == src else c for c in query_input(prompt))


def solve_replace_word(prompt):
    src, dst = re.match(r'Replace every word "(\w+)" with "(\w+)"\.', prompt).groups()
    return " ".join(dst if w == src else w for w in query_input(prompt).split())


def solve_head_tail(prompt):
    demos = [(x.split(), y.split()) for x, y in demo_pairs(prompt)]
    (head,), (tail,) = {y[0] for _, y in demos}, {y[-1] for _, y in demos}  # induced: one head, one tail
    assert all(y == [head, *x, tail] for x, y in demos)
    return " ".join([head, query_input(prompt), tail])


def solve_full_repeating(prompt):
    assert all(y == f"{x} {x}" for x, y in demo_pairs(prompt))
    return f"{query_input(prompt)} {query_input(prompt)}"


def solve_head_slicing(prompt):
    demos = [(x.split(), y.split()) for x, y in demo_pairs(prompt)]
    (k,) = {len(y) for _, y in demos}
    assert all(y == x[:k] and len(x) > k for x, y in demos)
    return " ".join(query_input(prompt).split()[:k])


def solve_multi_key_retrieval(prompt):
    text, question = body(blocks(prompt)[1]).split("\nQuestion: ")
    values = dict(re.findall(r"The secret number of (\w+) is (\d+)\.", text))
    return values[re.fullmatch(r"What is the secret number of (\w+)\?", question).group(1)]


def story(prompt):
    *lines, question = body(blocks(prompt)[1]).split("\n")
    return lines, question


def solve_single_supporting_fact(prompt):
    lines, question = story(prompt)
    where = {}
    for line in lines:
        if m := re.fullmatch(r"(\w+) (?:went|journeyed|travelled|moved) to the (\w+)\.", line):
            where[m[1]] = m[2]
    return where[re.fullmatch(r"Question: Where is (\w+)\?", question)[1]]


def solve_two_supporting_facts(prompt):
    lines, question = story(prompt)
    where, holder, dropped = {}, {}, {}
    for line in lines:
        if m := re.fullmatch(r"(\w+) (?:went|journeyed|travelled|moved) to the (\w+)\.", line):
            where[m[1]] = m[2]
        elif m := re.fullmatch(r"(\w+) (?:picked up|got|grabbed) the (\w+)\.", line):
            holder[m[2]] = m[1]
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down) the (\w+)\.", line):
            dropped[m[2]] = where[holder.pop(m[2])]
    obj = re.fullmatch(r"Question: Where is the (\w+)\?", question)[1]
    return where[holder[obj]] if obj in holder else dropped[obj]


SAMPLE_LABELS = {r["text"]: r["label"] for r in map(json.loads, symbolic.SAMPLE.read_text().splitlines())}


def solve_symbolic_sample(prompt, meta):
    """The query's label from the dataset file, as the symbol that the demonstrations use for that label."""
    demos, query = blocks(prompt)
    shown = {SAMPLE_LABELS[body(b).removeprefix("Input: ")]: answer_line(b) for b in demos}
    assert shown == meta["symbols"]  # every demonstration carries its own label's symbol
    return shown[SAMPLE_LABELS[body(query).removeprefix("Input: ")]]


SOLVERS = {
    "counting": solve_counting, "replace_lowercase": solve_replace_lowercase, "replace_word": solve_replace_word,
    "head_tail": solve_head_tail, "full_repeating": solve_full_repeating, "head_slicing": solve_head_slicing,
    "multi_key_retrieval": solve_multi_key_retrieval, "single_supporting_fact": solve_single_supporting_fact,
    "two_supporting_facts": solve_two_supporting_facts, "symbolic_sample": solve_symbolic_sample,
}


def test_same_seed_same_items_and_seeds_differ():
    for name in OFFLINE:
        a, b, c = (SUBTASKS[name].build(20, seed) for seed in (7, 7, 8))
        assert [x.model_dump() for x in a] == [x.model_dump() for x in b], name
        assert [x.prompt for x in a] != [x.prompt for x in c], name


def test_default_sizes_and_categories(items):
    assert {k: len(v) for k, v in items.items()} == {
        "counting": 148, "replace_lowercase": 300, "replace_word": 300, "head_tail": 100, "full_repeating": 100,
        "head_slicing": 100, "multi_key_retrieval": 300, "single_supporting_fact": 300, "two_supporting_facts": 300,
        "symbolic_sample": 48}  # the sample has 48 examples: each is a query once
    for name, its in items.items():
        assert {(it.subtask, it.category) for it in its} == {(name, SUBTASKS[name].category)}


@pytest.mark.parametrize("name", OFFLINE)
def test_answers_match_an_independent_solver(items, name):
    for it in items[name]:
        got = SOLVERS[name](it.prompt, it.meta) if name == "symbolic_sample" else SOLVERS[name](it.prompt)
        assert got == it.answer, it.prompt


@pytest.mark.parametrize("name", OFFLINE)
def test_demonstrations_never_leak_the_query(items, name):
    transforms = SUITES["rule"] + SUITES["pattern"]
    n_shots = {"counting": 0, "replace_lowercase": 4, "replace_word": 4, "head_tail": 5, "full_repeating": 5,
               "head_slicing": 5, "symbolic_sample": 3 * 2}.get(name, 2)
    for it in items[name]:
        demos, query = blocks(it.prompt)
        assert len(demos) == n_shots
        assert body(query) not in {body(d) for d in demos}
        assert len({body(d) for d in demos}) == len(demos)  # k shots are k different examples
        if name in transforms:  # a transform's answer must not be copyable from a demonstration
            assert it.answer not in {answer_line(d) for d in demos}


def test_symbols_are_unseen_and_balanced(items):
    for it in items["symbolic_sample"]:
        symbols = it.meta["symbols"]
        assert len(set(symbols.values())) == len(symbols) == 3
        label_lines = [line for line in it.prompt.split("\n") if line.startswith("Label:")]
        for s in symbols.values():
            assert it.prompt.count(s) == sum(line == f"Label: {s}" for line in label_lines) == 2  # 2 shots per label
            assert s not in " ".join(symbols)  # not a label word


def test_multi_field_jsonl_and_shots_per_label(tmp_path):
    rows = [{"texts": [f"premise {i}", f"hypothesis {i}"], "label": i % 2 == 0} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = symbolic.load_jsonl(path)
    assert examples[0].texts == ("premise 0", "hypothesis 0") and examples[0].label == "True"
    its = symbolic.symbolic_items(examples, n=5, seed=1, subtask="pairs", category="symbolic_local", shots_per_label=3)
    for it in its:
        demos, query = blocks(it.prompt)
        assert len(demos) == 6 and query.startswith("Input 1: premise ") and "\nInput 2: hypothesis " in query
        i = int(query.split("\n")[0].rsplit(" ", 1)[1])
        assert it.answer == it.meta["symbols"][str(i % 2 == 0)]


def test_paper_category_numbers_are_means_of_their_subtasks():
    categories = {s: c.category for s, c in SUBTASKS.items()}
    for model in PAPER_MODELS:
        subs = {s: paper_numbers[s][model] for s in categories if s in paper_numbers}
        known = {s: v for s, v in subs.items() if v is not None}
        for cat, avg in category_averages(known, categories).items():
            if all(subs.get(s) is not None for s in SUITES[cat]):
                assert avg == pytest.approx(paper_numbers[cat][model], abs=0.01), (cat, model)
    assert paper_numbers["symbolic_clue"] == {"FLM-101B": 42.07, "GPT-3": None, "GLM-130B": 39.96}
