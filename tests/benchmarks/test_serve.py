"""Smoke test of benchmarks/serve.py: --quick (an untrained 2-layer model) runs end to end and writes a complete
report. The speed goals themselves are not checked (a 16-token run on a shared machine says nothing about them);
only that every number is there (1, 4 and 16 clients, the bandwidth bound, the matmul kernels), finite and positive,
and that our greedy text equals transformers'."""

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
    assert positive(result["copy_bandwidth_gb_s"]) and result["clients"] == [1, 4, 16]
    m = result["models"]["untrained"]
    assert positive(m["weight_bytes_per_step"]) and positive(m["bound_tokens_per_s"])
    a = m["single_request"]
    assert a["new_tokens"] == 16 and a["same_greedy_text"] is True
    assert positive(a["speedup"]) and positive(a["speedup_cpu"]) and positive(a["fraction_of_bound"])
    assert all(positive(a[k][m]) for k in ("engine", "transformers") for m in ("tokens_per_s", "tokens_per_cpu_s"))
    b = m["batching"]
    assert b["peak_batch"] > 1 and positive(b["scaling"])
    for c in (1, 4, 16):
        run = b[str(c)]
        assert run["clients"] == c
        assert run["tokens"] == run["requests"] * 16  # every request decodes exactly max_tokens
        assert all(positive(run[k]) for k in ("tokens_per_s", "tokens_per_cpu_s", "ttft_p50_s", "ttft_p99_s",
                                              "fraction_of_bound"))
        assert run["ttft_p50_s"] <= run["ttft_p99_s"]
    kernels = m["linear_kernels"]
    assert all(positive(v) for k in kernels if k.startswith("rows_") for v in kernels[k].values())
    assert "vllm" not in m  # --vs-vllm only on request
    assert set(result["goals"]) == {"untrained: 16_clients >= 10x single stream",
                                    "untrained: single stream >= 60% of the bound"}
