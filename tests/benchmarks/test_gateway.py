"""Smoke test of benchmarks/gateway.py at a small size: a real uvicorn gateway, POSTs, and both GET load generators
(the lean HTTP/1.1 client and httpx) report positive rates, with the gateway's and the clients' CPU per request.
The throughput goal itself is not checked (one second of load on a shared machine says nothing about it)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_small_run_report(tmp_path):
    out = tmp_path / "gateway.png"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gateway.py"), "--posts", "10", "--seconds", "1",
                           "--concurrency", "4", "--ray-jobs", "0", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 10_000
    assert result["post_concurrency_1"]["n"] == result["post_concurrency_8"]["n"] == 10
    for name in ("get", "get_httpx"):
        get = result[name]
        assert get["requests"] > 0 and get["concurrency"] == 4
        assert all(isinstance(get[k], float) and math.isfinite(get[k]) and get[k] > 0 for k in (
            "req_per_s", "p50_ms", "server_cpu_ms_per_request", "load_generator_cpu_ms_per_request")), get
    assert result["get"]["job"] == {"metrics_records": 36, "checkpoints": 4}
    assert set(result["goals"]) == {"post_p50_ms<=50", "get_req_per_s>=500", "get_one_core_req_per_s>=500"}
