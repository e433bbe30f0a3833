"""Smoke test of benchmarks/loss_prediction.py: --quick trains the micro proxy family at five widths, fits the power
law on four and predicts the fifth; the report is complete and its numbers agree with each other. The prediction
error itself is not checked (20 steps of a 2-layer model say nothing about it); the full run is in the README."""

import math

import pytest

from flm.scaling import PowerLaw


@pytest.mark.timeout(300)
def test_quick_mode_report(run_quick):
    result, _ = run_quick("loss_prediction")

    runs = result["runs"]
    assert [r["width"] for r in runs] == [16, 24, 32, 48, 96]
    assert all(r["steps"] == result["steps"] == 20 and r["tokens"] == result["tokens_per_width"] for r in runs)
    assert all(math.isfinite(r["val_loss"]) and not r["diverged"] for r in runs)
    n = [r["non_embedding_params"] for r in runs]
    assert n == sorted(n) and all(r["params"] > r["non_embedding_params"] for r in runs)

    p = result["prediction"]
    assert p["fitted_widths"] == [16, 24, 32, 48] and p["width"] == 96 and p["predicted_width_is_2x_widest_fitted"]
    law = PowerLaw(a=p["a"], b=p["b"], c=p["c"])
    assert p["predicted"] == pytest.approx(law(runs[-1]["non_embedding_params"]), rel=1e-12)
    assert p["actual"] == runs[-1]["val_loss"]
    assert p["rel_error"] == pytest.approx(abs(p["predicted"] - p["actual"]) / p["actual"], rel=1e-12)
    assert p["met"] == (p["rel_error"] <= 0.02)
    for r, res in zip(runs[:-1], p["residuals"], strict=True):
        assert res == pytest.approx(r["val_loss"] - law(r["non_embedding_params"]), abs=1e-9)
    assert result["baseline_widest_fitted"]["predicted"] == runs[-2]["val_loss"]
    assert result["prediction_total_params"]["n"] == runs[-1]["params"]
