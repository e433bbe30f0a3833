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
