"""Smoke test of benchmarks/growth_vs_scratch.py (issue 15's protocol runner): --quick runs the whole campaign on
tiny shapes (pilot, bracketing sweeps, every arm, the analysis and the PNGs), writes one JSON per run, and a second
call after a lost run trains only that run.

The figures themselves are not checked (an 8-step run says nothing about growth); only that every arm ran on the
budget the protocol gives it, every reported number is finite or explicitly absent, and the rules are applied.
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
ARMS = {"scratch_cosine", "scratch_restarts", "scratch_at_msg", "msg", "stack", "stack_at_msg", "small_only",
        "small_at_msg"}


def finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def quick(tmp_path: Path, data: Path) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--data", str(data), "--out", str(out),
                           "--results", str(tmp_path / "res"), "--workdir", str(tmp_path / "w")], cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=590)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout) == result
    return result


@pytest.mark.timeout(600)
def test_quick_campaign_and_resume(tmp_path, micro_data):
    result = quick(tmp_path, micro_data)
    res = tmp_path / "res"
    runs = {kind: sorted(p.name for p in (res / kind).glob("*.json")) for kind in ("pilot", "sweeps", "headline")}
    assert result["runs_trained"] == sum(map(len, runs.values())) and result["runs_read"] == 0
    for png in ("pilot.png", "headline.png"):
        assert (res / png).stat().st_size > 10_000

    # the pilot: three arms swept and run at seed 100, the chosen scratch schedule and small_only at 101
    pilot = result["pilot"]
    assert json.loads((res / "pilot.json").read_text()) == pilot
    (b,) = pilot["budgets"]
    assert set(b["sweeps"]) == {"small_only", "scratch_cosine", "scratch_restarts"}
    assert set(b["final_val_loss"][pilot["scratch_schedule"]]) == {"100", "101"}
    assert b["qualifies"] == (b["small_minus_scratch"] >= 0.1)

    head = result["headline"]
    assert set(head["arms"]) == ARMS and set(head["sweeps"]) == ARMS
    for sweep in head["sweeps"].values():  # one-point grid: the chosen end point extends the grid once (downward)
        assert len(sweep["val_loss"]) == 2 and sweep["extended"]
    arms = head["arms"]
    for arm, info in arms.items():
        assert finite(info["final_val_loss"]["mean"]) and finite(info["flops"]) and finite(info["train_s"]["mean"])
        run = json.loads((res / "headline" / f"B{head['budget_tokens'] / 1e6:g}M-{arm}-s0-lr{info['lr']:g}.json")
                         .read_text())
        assert run["spec"]["arm"] == arm and run["evals"][-1]["step"] == run["spec"]["steps"]
        assert [e["flops"] for e in run["evals"]] == sorted(e["flops"] for e in run["evals"])
    # budgets: the B arms train the same tokens; the *_at_msg arms spend MSG's FLOPs within a step's worth
    assert len({arms[a]["tokens"] for a in ("scratch_cosine", "scratch_restarts", "msg", "stack", "small_only")}) == 1
    for arm in ("scratch_at_msg", "stack_at_msg", "small_at_msg"):
        assert abs(arms[arm]["flops"] / arms["msg"]["flops"] - 1) < 0.35  # an 8-step budget: a step is 10-30% of these
    assert len(arms["msg"]["growth_dloss"]) == 2 and len(arms["stack"]["growth_dloss"]) == 1
    assert arms["scratch_restarts"]["growth_dloss"] == []  # LR restarts are not growth events

    ref = head["reference"]
    assert ref == pilot["scratch_schedule"]
    sp = head["speedup_to_scratch_final_loss"]
    assert set(sp) == ARMS - {ref}
    for arm in sp.values():
        assert arm["flops"]["mean"] is None or finite(arm["flops"]["ci95"][0])
        assert finite(arm["final_gap"]["mean"])
    claims = head["claims"]
    assert claims["preservation"]["met"] and claims["preservation"]["max_dloss"] <= 1e-5  # ramped MSG
    assert set(claims["equal_compute"]["arms"]) == {"msg", "scratch_at_msg", "stack_at_msg", "small_at_msg"}
    assert isinstance(claims["speed"]["met"], bool)
    assert "msg" in head["interpolation_check"]  # seed 0's msg ran on the dense grid
    # the 1% grid's error on the dense curves, for every other arm's final loss they cross
    dense = head["interpolation_error_dense_curves"]
    assert set(dense) == {ref, "msg"}
    for curve in dense.values():
        rows = curve["targets"].values()
        assert all(r["rel_diff"] == pytest.approx(r["reach_flops_1pct"] / r["reach_flops_dense"] - 1) for r in rows)
        assert curve["max_abs_rel_diff"] == (max(abs(r["rel_diff"]) for r in rows) if rows else None)

    # a killed campaign: one lost run is the only one trained again, the rest are read back
    lost = res / "headline" / runs["headline"][0]
    lost.unlink()
    again = quick(tmp_path, micro_data)
    assert again["runs_trained"] == 1 and again["runs_read"] == result["runs_trained"] - 1
    assert lost.exists() and again["headline"]["arms"].keys() == arms.keys()
