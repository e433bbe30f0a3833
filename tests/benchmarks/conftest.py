"""Benchmark smoke tests run a script's --quick mode as a user would: a subprocess on the session's micro dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_quick(tmp_path, micro_data):
    """run_quick("loss_prediction") -> (the result JSON it wrote, that file's path); asserts a clean exit, that the
    printed JSON is the written one and that a PNG was drawn next to it."""

    def run(name: str, timeout: int = 290) -> tuple[dict, Path]:
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--data",
                               str(micro_data), "--out", str(out), "--workdir", str(tmp_path / "w")],
                              cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads(out.read_text())
        assert json.loads(proc.stdout) == result
        assert out.with_suffix(".png").stat().st_size > 10_000
        return result, out

    return run
