"""Smoke test of benchmarks/mup_transfer.py: --quick sweeps 3 LRs at width 16 and at 64 under μP and SP; the verdict
agrees with the sweeps, and the benchmark's premise holds: at the small width (= base_width) a standard-
parametrisation run is the μP run, to the last digit. Whether the LR transfers is not checked at 20 steps; the full
run is in the README."""

import math

import pytest
import torch

from flm.config import ProxyFamily
from flm.scaling import proxy_plan, train_proxy


@pytest.mark.timeout(300)
def test_quick_mode_report(run_quick, tmp_path):
    result, _ = run_quick("mup_transfer")
    assert result["widths"] == [16, 64] and result["lrs"] == [4e-3, 1.6e-2, 6.4e-2] and result["grid_step"] == 4.0
    assert len(result["runs"]) == 9 and all(r["steps"] == 20 for r in result["runs"])

    for param in ("mup", "sp"):
        sweeps, v = result["sweeps"][param], result["verdict"][param]
        assert sweeps["16"] == result["sweeps"]["mup"]["16"]  # one small-width sweep serves both
        for width, key in (("16", "best_lr_small"), ("64", "best_lr_large")):
            finite = {float(lr): x for lr, x in sweeps[width].items() if math.isfinite(x)}
            assert v[key] == min(finite, key=finite.get)
        assert v["shift_grid_steps"] == round(math.log(v["best_lr_large"] / v["best_lr_small"], 4))
        for key in ("best_lr_small", "best_lr_large"):  # the parabola's vertex lies within half a step of the argmin
            fine = v[f"interpolated_{key}"]
            assert fine is None or v[key] / 2 <= fine <= v[key] * 2
        if v["interpolated_shift_grid_steps"] is not None:
            assert v["interpolated_shift_grid_steps"] == pytest.approx(
                math.log(v["interpolated_best_lr_large"] / v["interpolated_best_lr_small"], 4))
        assert v["transfers"] == (abs(v["shift_grid_steps"]) <= 1)
        assert v["regret"] == pytest.approx(v["large_loss_at_small_best_lr"] - v["large_best_loss"], abs=1e-12)
        assert v["regret"] >= 0
    assert result["claim_holds"] == (result["verdict"]["mup"]["transfers"] and not result["verdict"]["sp"]["transfers"])
    large = {(r["parametrization"], r["lr"]): r["val_loss"] for r in result["runs"] if r["width"] == 64}
    assert large[("mup", 4e-3)] != large[("sp", 4e-3)]  # at 4x the parametrisations differ

    # the premise: at base_width, SP and μP are the same model (same init, LRs and logits)
    family = ProxyFamily.model_validate(result["family"])
    first = next(r for r in result["runs"] if r["width"] == 16 and r["lr"] == 4e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the benchmark's worker processes
    try:
        sp = train_proxy(proxy_plan(family, 16, tmp_path / "sp16", lr=4e-3, parametrization="sp",
                                    data=result["data"], eval_batches=result["eval_batches"]))
    finally:
        torch.set_num_threads(threads)
    assert sp["val_loss"] == first["val_loss"]
