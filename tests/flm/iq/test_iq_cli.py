"""`flm eval --suite iq` from the command line: the table beside the paper's numbers, and bad input as one line
with exit code 2 (unknown suite or subtask, a dataset file without labels, an unreachable endpoint)."""

import json

import pytest

from flm.cli import main
from flm.iq.suite import SuiteResult, build_items

UNREACHABLE = "http://127.0.0.1:9/v1"  # the discard port: nothing listens, the connection is refused at once


def exits_with_one_line(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("flm: error:") and all(w in err for w in words), err


def test_bad_input(tmp_path, capsys):
    exits_with_one_line(capsys, ["eval", UNREACHABLE, "--suite", "nope"], "'nope'", "iq, perplexity")
    exits_with_one_line(capsys, ["eval", UNREACHABLE, "--subtasks", "counting,countin"], "'countin'", "offline")
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text(json.dumps({"text": "a", "label": "x"}) + "\n" + json.dumps({"text": "b"}) + "\n")
    exits_with_one_line(capsys, ["eval", UNREACHABLE, "--subtasks", "mine", "--data-file", f"mine={unlabelled}"],
                        "unlabelled.jsonl:2", "no 'label'")
    exits_with_one_line(capsys, ["eval", UNREACHABLE, "--data-file", str(unlabelled)], "NAME=PATH")
    exits_with_one_line(capsys, ["eval", UNREACHABLE, "--subtasks", "counting", "--n-items", "2",
                                 "--out", str(tmp_path)], "127.0.0.1:9", "unreachable")
    exits_with_one_line(capsys, ["eval", str(tmp_path / "missing"), "--subtasks", "counting"], "missing", "no such")


@pytest.fixture()
def oracle_endpoint(completions_server, tmp_path):
    """An endpoint that knows the answers of counting and of local data named BoolQ and AFQMC, and those files."""
    rows = [{"texts": [f"passage {i}", f"question {i}?"], "label": i % 2} for i in range(12)]
    files = {}
    for name in ("boolq", "afqmc"):
        files[name] = tmp_path / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = build_items(["counting", "boolq", "afqmc"], n_items=4, data_files=files)
    return completions_server({it.prompt: it.answer for its in items.values() for it in its}), files


def test_table_shows_the_papers_numbers_per_subtask_and_category(oracle_endpoint, tmp_path, capsys):
    url, files = oracle_endpoint
    assert main(["eval", url, "--subtasks", "counting,boolq,afqmc", "--n-items", "4", "--out", str(tmp_path),
                 *(f"--data-file={name}={path}" for name, path in files.items())]) == 0
    table = [(line.split("│")[2].strip(), [c.strip() for c in line.split("│")[3:-1]])
             for line in capsys.readouterr().out.splitlines() if line.count("│") == 8]
    rows = dict(table)
    assert rows["Counting"] == ["4", "100.00", "69.59", "82.43", "60.81"]
    assert rows["BoolQ"] == ["4", "100.00", "49.50", "50.84", "40.13"]
    assert rows["AFQMC"] == ["4", "100.00", "n/a", "n/a", "n/a"]  # only the CLUE-IQ average is copied
    assert [cells for name, cells in table if name == "average"] == [
        ["", "100.00", "76.42", "86.03", "71.49"],  # rule understanding
        ["", "100.00", "46.76", "47.60", "48.19"],  # SuperGLUE-IQ
        ["", "100.00", "42.07", "–", "39.96"],  # CLUE-IQ: GPT-3 has no CLUE number
    ]
    result = SuiteResult.model_validate_json((tmp_path / "iq.json").read_text())
    assert result.categories == {"rule": 100.0, "symbolic_superglue": 100.0, "symbolic_clue": 100.0}
