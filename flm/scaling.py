"""Loss prediction (FLM-101B, after μScaling): fit L(N) = a·N^b + c over a family of μP proxy widths trained with
the same hyperparameters to the same step, then extrapolate to a larger N. b < 0; c is the irreducible loss."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel
from scipy.optimize import curve_fit


class PowerLaw(BaseModel):
    a: float
    b: float
    c: float

    def __call__(self, n: float | np.ndarray) -> float | np.ndarray:
        return self.a * np.power(n, self.b) + self.c


def fit_power_law(n: list[float], loss: list[float]) -> PowerLaw:
    """Least-squares fit of L(N) = a·N^b + c; N in parameters (or any size measure), at least 3 points."""
    if len(n) != len(loss) or len(n) < 3:
        raise ValueError(f"need at least 3 (N, loss) points of equal count, got {len(n)} and {len(loss)}")
    x, y = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    if np.any(x <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("N must be positive and losses finite")
    scale = x.min()  # fit in units of the smallest N: keeps a near the loss range, whatever N's magnitude
    b0 = -0.3
    a0 = max((y.max() - y.min()) / max(1 - (x.max() / scale) ** b0, 1e-6), 1e-6)
    c0 = max(y.min() - 0.1 * (y.max() - y.min()), 0.0)
    (a, b, c), _ = curve_fit(lambda t, a, b, c: a * np.power(t, b) + c, x / scale, y, p0=(a0, b0, c0),
                             bounds=([0, -5, -np.inf], [np.inf, 0, np.inf]), maxfev=20000)
    return PowerLaw(a=float(a * scale ** (-b)), b=float(b), c=float(c))
