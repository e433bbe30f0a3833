"""api/runs.py: the incremental reader of a run's metric stream keeps up with appends, holds back a line still being
written, and notices when a resumed trainer rewrites the file (even to a longer one); plan totals."""

import json
import os

from api.runs import RunReader, plan_totals
from tests.conftest import micro_plan


def write(path, records, mode="a", partial=""):
    with open(path, mode) as f:
        f.write("".join(json.dumps(r) + "\n" for r in records) + partial)
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))  # a new mtime even within the clock's resolution


def test_reader_follows_appends_partial_lines_and_rewrites(tmp_path):
    reader, path = RunReader(), tmp_path / "metrics.jsonl"
    assert reader.metrics(tmp_path) == []
    first = [{"step": i, "loss": 5.0 - i} for i in range(1, 6)]
    write(path, first[:3], "w", partial='{"step": 4, "lo')
    assert reader.metrics(tmp_path) == first[:3]  # the half-written line waits
    with open(path, "w") as f:  # the writer finishes the line and appends one more
        f.write("".join(json.dumps(r) + "\n" for r in first))
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 2))
    assert reader.metrics(tmp_path) == first
    # a resumed trainer truncates to its checkpoint (3 records) and appends 4 new ones: longer than before
    resumed = first[:3] + [{"step": i, "loss": 9.0, "resumed": True} for i in range(4, 8)]
    write(path, resumed, "w")
    assert os.path.getsize(path) > sum(len(json.dumps(r)) + 1 for r in first)
    assert reader.metrics(tmp_path) == resumed


def test_plan_totals_are_the_plan_steps_and_tokens(tmp_path):
    plan = micro_plan(tmp_path, tmp_path)
    assert plan_totals(plan) == (36, 36 * 4 * 32)
