"""Smoke test of benchmarks/growth_vs_scratch.py: the --quick mode runs end to end and writes a complete report.

The speedup value itself is not checked (a one-seed, 16-step run says nothing about it); only that every arm ran
and every reported number is finite.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "growth_vs_scratch.py"
ARMS = ("scratch", "msg", "stack")


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


@pytest.mark.timeout(600)
def test_quick_mode_report(tmp_path, micro_data):
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(micro_data), "--out", str(out),
                           "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=590)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "curves" not in printed and set(result["curves"]) == set(ARMS)

    assert set(result["arms"]) == set(ARMS)
    for arm in ARMS:
        info = result["arms"][arm]
        assert finite(info["final_val_loss"]["mean"]) and finite(info["flops"]) and finite(info["train_s"]["mean"])
        evals = result["curves"][arm]["0"]["evals"]
        assert len(evals) >= 3
        assert all(finite(e["val_loss"]) and finite(e["flops"]) and finite(e["train_s"]) for e in evals)
        assert [e["flops"] for e in evals] == sorted(e["flops"] for e in evals)
    # every arm trains the same tokens; growth arms spend fewer FLOPs and record their growth events
    tokens = {result["curves"][a]["0"]["evals"][-1]["tokens"] for a in ARMS}
    assert len(tokens) == 1
    assert len(result["curves"]["msg"]["0"]["growth"]) == 2 and len(result["curves"]["stack"]["0"]["growth"]) == 1
    for arm in ("msg", "stack"):
        assert result["arms"][arm]["flops"] < result["arms"]["scratch"]["flops"]
        sp = result["speedup_to_scratch_final_loss"][arm]
        assert {"flops", "wall", "reached", "final_gap", "per_seed"} <= set(sp)
        assert finite(sp["final_gap"]["mean"])
        for key in ("flops", "wall"):  # None only when the arm never reached scratch's final loss
            assert sp[key]["mean"] is None or finite(sp[key]["mean"])
        eq = result["equal_flops"][arm]
        assert finite(eq["arm_val_loss"]["mean"]) and finite(eq["scratch_val_loss"]["mean"])
        assert 0 < eq["flops_fraction_of_scratch"] < 1
    assert result["arms"]["msg"]["growth_dloss"][0]["mean"] < 1e-3  # MSG preserves the function; stacking need not
    assert finite(result["wall_s_total"])
