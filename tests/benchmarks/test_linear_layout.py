"""benchmarks/linear_layout.py: its input-major weights hold the same values and give the same products as the
usual layout (so the timing compares like with like), and a short timing pass returns positive figures."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

SPEC = importlib.util.spec_from_file_location(
    "linear_layout", Path(__file__).resolve().parents[2] / "benchmarks" / "linear_layout.py")
linear_layout = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(linear_layout)


def test_layouts_agree_and_time_positive():
    gen = torch.Generator().manual_seed(0)
    out_major = [torch.randn(o, i, generator=gen) for o, i in linear_layout.SHAPES[:4]]
    in_major = [w.t().contiguous().t() for w in out_major]
    x = {d: torch.randn(3, d, generator=gen) for d in (256, 1024)}
    for a, b in zip(out_major, in_major, strict=True):
        assert torch.equal(a, b) and b.t().is_contiguous() and not b.is_contiguous()
        ya, yb = F.linear(x[a.shape[1]], a), F.linear(x[b.shape[1]], b)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-4)  # only the summation order differs
    assert linear_layout.step_us(in_major, x, repeats=1, n=2) > 0
