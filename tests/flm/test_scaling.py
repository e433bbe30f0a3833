"""flm/scaling.py recovers a known power law and extrapolates it."""

import numpy as np
import pytest

from flm.scaling import PowerLaw, fit_power_law


@pytest.mark.parametrize("a,b,c", [(40.0, -0.3, 2.0), (400.0, -0.5, 1.2), (12.0, -0.1, 0.5)])
def test_recovers_noiseless_parameters(a, b, c):
    truth = PowerLaw(a=a, b=b, c=c)
    n = [1e6, 2e6, 4e6, 8e6]
    fit = fit_power_law(n, [truth(x) for x in n])
    assert fit.a == pytest.approx(a, rel=1e-4) and fit.b == pytest.approx(b, rel=1e-4)
    assert fit.c == pytest.approx(c, rel=1e-4, abs=1e-6)
    assert fit(1.6e7) == pytest.approx(truth(1.6e7), rel=1e-6)


def test_bad_input():
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1, 2], [3, 2])
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([0, 1, 2], [3, 2, 1])
    with pytest.raises(ValueError, match="finite"):
        fit_power_law([1, 2, 3], [3, np.nan, 1])


MICRO_FAMILY = {
    "model": {"n_layer": 2, "d_model": 32, "n_head": 2, "head_dim": 16, "vocab_size": 320, "seq_len": 32,
              "base_width": 32, "output_mult": 2.0, "init_std": 0.02},
    "widths": [16, 32, 48], "tokens": 4 * 32 * 10, "batch_size": 4, "lr": 1e-2,
}


def test_flm_predict_trains_fits_and_extrapolates(tmp_path, micro_data, capsys):
    import json

    import yaml

    from flm.cli import main
    from flm.config import ProxyFamily
    from flm.flops import param_count

    (tmp_path / "family.yaml").write_text(yaml.safe_dump(MICRO_FAMILY))
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "family.yaml"), "--at", "96,192", "--data", str(micro_data),
                 "--eval-batches", "2", "--out", str(out)]) == 0
    result = json.loads((out / "prediction.json").read_text())
    runs, fit = result["runs"], PowerLaw(**result["fit"])
    assert [r["width"] for r in runs] == [16, 32, 48] and all(r["steps"] == 10 for r in runs)
    family = ProxyFamily.model_validate(MICRO_FAMILY)
    for r in runs:
        assert r["non_embedding_params"] == param_count(family.at_width(r["width"]), embeddings=False)
    refit = fit_power_law([r["non_embedding_params"] for r in runs], [r["val_loss"] for r in runs])
    assert refit.model_dump() == pytest.approx(fit.model_dump(), rel=1e-9)
    for t, w in zip(result["predictions"], (96, 192), strict=True):
        assert t["width"] == w and t["n"] == param_count(family.at_width(w), embeddings=False)
        assert t["predicted"] == pytest.approx(fit(t["n"]), rel=1e-12)
    assert (out / "prediction.png").stat().st_size > 10_000
    assert "192" in capsys.readouterr().out

    # a width the head size does not divide, and hyperparameters searched at another base width: exit 2
    assert main(["predict", str(tmp_path / "family.yaml"), "--widths", "16,24,32"]) == 2
    assert "widths: 24 is not a positive multiple of head_dim=16" in capsys.readouterr().err
    (tmp_path / "best.yaml").write_text(yaml.safe_dump({"lr": 1e-3, "init_std": 0.02, "output_mult": 1.0,
                                                        "base_width": 64}))
    assert main(["predict", str(tmp_path / "family.yaml"), "--hparams", str(tmp_path / "best.yaml")]) == 2
    assert "searched at base_width 64 (mup), the family's is 32 (mup)" in capsys.readouterr().err


def test_a_diverging_proxy_run_stops_with_an_infinite_loss(tmp_path, micro_data):
    from flm.config import ProxyFamily
    from flm.scaling import proxy_plan, train_proxy

    family = ProxyFamily.model_validate({**MICRO_FAMILY, "tokens": 4 * 32 * 30})
    result = train_proxy(proxy_plan(family, 32, tmp_path / "run", lr=1e30, data=str(micro_data), warmup_fraction=0))
    assert result["diverged"] and result["val_loss"] == float("inf")
    assert result["steps"] == 10  # stopped at the first training-loss record, not after all 30 steps
    assert not (tmp_path / "run" / "checkpoints").exists()
