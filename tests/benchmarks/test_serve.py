"""Smoke test of benchmarks/serve.py: --quick (an untrained 2-layer model) runs end to end and writes a complete
report. The speed goals themselves are not checked (a 16-token run on a shared machine says nothing about them);
only that every number is there, finite and positive, and that our greedy text equals transformers'."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_quick_mode_report(tmp_path):
    out = tmp_path / "serve.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=290)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    assert out.with_suffix(".png").stat().st_size > 10_000
    a = result["single_request"]
    assert a["new_tokens"] == 16 and a["same_greedy_text"] is True
    assert positive(a["speedup"]) and positive(a["speedup_cpu"])
    assert all(positive(a[k][m]) for k in ("engine", "transformers") for m in ("tokens_per_s", "tokens_per_cpu_s"))
    b = result["batching"]
    assert b["one"]["clients"] == 1 and b["many"]["clients"] == 16 and b["peak_batch"] > 1
    for run in (b["one"], b["many"]):
        assert run["tokens"] == run["requests"] * 16  # every request decodes exactly max_tokens
        assert all(positive(run[k]) for k in ("tokens_per_s", "tokens_per_cpu_s", "ttft_p50_s", "ttft_p99_s"))
        assert run["ttft_p50_s"] <= run["ttft_p99_s"]
    assert set(result["goals"]) == {"single_request_speedup>=1.5", "16_clients_speedup>=6"}
