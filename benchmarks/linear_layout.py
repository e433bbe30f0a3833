"""Why service/tp.py stores projection weights input-major on CPU: the projections of one decode step of the tiny
model (4 blocks x qkv, attention out, FFN in, FFN out; d_model 256, d_ffn 1024), run in sequence as a step runs
them, with each weight in the usual (out, in) layout and input-major (the transpose of a contiguous (in, out)
matrix: the same values), for 1 and 16 rows, one torch thread. Prints JSON: microseconds per step and the ratio.

    .venv/bin/python benchmarks/linear_layout.py
"""

from __future__ import annotations

import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(768, 256), (256, 256), (1024, 256), (256, 1024)] * 4  # (out, in) of each projection, block by block


def step_us(weights: list[torch.Tensor], x: dict[int, torch.Tensor], repeats: int = 7, n: int = 200) -> float:
    """Median over `repeats` of the mean time of one pass over every weight."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            for w in weights:
                F.linear(x[w.shape[1]], w)
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def main() -> dict:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    out_major = [torch.randn(o, i, generator=gen) for o, i in SHAPES]
    in_major = [w.t().contiguous().t() for w in out_major]
    result = {"threads": 1, "projections": len(SHAPES)}
    for rows in (1, 16):
        x = {d: torch.randn(rows, d, generator=gen) for d in (256, 1024)}
        a, b = step_us(out_major, x), step_us(in_major, x)
        result[f"rows_{rows}"] = {"out_major_us": round(a, 1), "input_major_us": round(b, 1),
                                  "speedup": round(a / b, 3)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
