"""benchmarks/data.py --quick: a real run of every local arm on 0.3 MB (the full run and its goals are in the
README); checks the report's shape and that every arm wrote the same dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_report(tmp_path):
    out = tmp_path / "data.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "data.py"), "--quick", "--out", str(out),
                           "--workdir", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result and out.with_suffix(".png").stat().st_size > 10_000
    assert [(a["mode"], a["num_proc"]) for a in result["arms"]] == [("datasets", 1), ("datasets", 2), ("datasets", 1)]
    assert result["identical_output_across_arms"]
    for arm in result["arms"]:
        assert arm["tokens"] > 30_000 and arm["tokenize_mb_per_s_per_core"] > 0 and arm["peak_anon_rss_bytes"] > 0
        assert arm["load_avg_1m_before"] >= 0
    assert abs(result["arms"][2]["corpus_mb"] - 2 * result["arms"][0]["corpus_mb"]) < 0.2, "the corpus doubled"
    assert result["scaling_efficiency_1_to_2"] == result["scaling_efficiency_per_round"][0] > 0
    assert set(result["goals"]) == {"scaling_efficiency>=0.8", "anon_rss_flat_when_corpus_doubles(<=1.2x)"}
    control = result["rounds"][0]["ceiling"]
    assert control["tokens"] == result["arms"][0]["tokens"], "the same documents, each with its eot"
    assert control["efficiency"] == result["ceiling_efficiency_1_to_2"] > 0
