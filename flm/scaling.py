"""Loss prediction (FLM-101B, after μScaling): fit L(N) = a·N^b + c over a family of μP proxy widths trained with
the same hyperparameters to the same step, then extrapolate to a larger N. b < 0; c is the irreducible loss.

The proxy runs themselves (`proxy_plan`, `train_proxy`) are shared by the Ray Tune search (cluster/tune.py) and the
benchmarks: one process, one stage, the ordinary training loop."""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from scipy.optimize import curve_fit

from flm.config import FLMConfigError, GrowthPlan, ProxyFamily, parse
from flm.flops import param_count
from flm.train import Trainer


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


# --- the proxy runs the fit is made of --------------------------------------------------------------------------------
def proxy_plan(family: ProxyFamily, width: int, out: str | Path, *, lr: float | None = None,
               init_std: float | None = None, output_mult: float | None = None,
               parametrization: str | None = None, tokens: int | None = None, data: str = "shakespeare",
               tokenizer: str = "bpe", seed: int = 0, eval_every: int | None = None, eval_batches: int = 4,
               warmup_fraction: float = 0.1, min_lr_ratio: float = 0.1, name: str = "proxy") -> GrowthPlan:
    """A one-stage plan training the proxy at `width` on `tokens` (default: the family's), with the family's
    hyperparameters unless given. Linear warmup over `warmup_fraction` of the steps, then a cosine to
    `min_lr_ratio` x lr; validation loss every `eval_every` steps (default: at the end only); no checkpoints
    besides the stage end."""
    model = family.at_width(width).model_dump()
    for key, value in (("init_std", init_std), ("output_mult", output_mult), ("parametrization", parametrization)):
        if value is not None:
            model[key] = value
    lr = family.lr if lr is None else lr
    steps = (tokens or family.tokens) // (family.batch_size * family.model.seq_len)
    if steps < 1:
        raise FLMConfigError(f"tokens: {tokens or family.tokens} is less than one step of {family.batch_size} x "
                             f"{family.model.seq_len} tokens")
    return parse(GrowthPlan, {
        "name": name, "seed": seed, "min_lr": lr * min_lr_ratio,
        "stages": [{"name": f"w{width}", "model": model, "tokens": steps * family.batch_size * family.model.seq_len,
                    "lr": lr, "batch_size": family.batch_size,
                    "warmup_samples": round(warmup_fraction * steps) * family.batch_size}],
        "train": {"data": str(data), "tokenizer": tokenizer, "out": str(out), "log_every": eval_every or steps,
                  "eval_every": eval_every or steps, "eval_batches": eval_batches, "checkpoint_every": 10**9,
                  "keep_checkpoints": 1},
    }, f"proxy at width {width}")


class Diverged(RuntimeError):
    """A proxy run's loss stopped being finite."""


def train_proxy(plan: GrowthPlan, on_eval: Callable[[dict], None] | None = None) -> dict:
    """Train a proxy plan from scratch in this process (its run directory is replaced, its checkpoints dropped after).

    Returns {params, non_embedding_params, steps, tokens, val_loss, loss, seconds, diverged}; a run whose loss is no
    longer finite stops there with val_loss = inf. `on_eval(record)` sees every record that has a val_loss."""
    run_dir = Path(plan.train.out)
    shutil.rmtree(run_dir, ignore_errors=True)
    last: dict = {}

    def watch(record: dict) -> None:
        if "loss" not in record:
            return
        last.update(record)
        if not (math.isfinite(record["loss"]) and math.isfinite(record.get("val_loss", 0.0))):
            raise Diverged(f"step {record['step']}: loss {record['loss']}, val_loss {record.get('val_loss')}")
        if "val_loss" in record and on_eval is not None:
            on_eval(record)

    cfg = plan.model_configs()[0]
    t0 = time.perf_counter()
    diverged = False
    try:
        Trainer(plan, on_record=watch).fit()
    except Diverged:
        diverged = True
    finally:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {"params": param_count(cfg), "non_embedding_params": param_count(cfg, embeddings=False),
            "steps": last.get("step", 0), "tokens": last.get("tokens", 0),
            "val_loss": math.inf if diverged else last["val_loss"], "loss": last.get("loss", math.nan),
            "seconds": time.perf_counter() - t0, "diverged": diverged}


def _train_with_threads(plan: GrowthPlan, threads: int) -> dict:
    torch.set_num_threads(threads)
    return train_proxy(plan)


def train_proxies(plans: list[GrowthPlan], jobs: int = 1, threads: int = 1,
                  on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train independent proxy plans, `jobs` at a time in worker processes of `threads` torch threads each (jobs=1:
    in this process); results in the order of `plans`. `on_done(index, result)` is called as each finishes.
    One thread per process is the robust choice on a shared CPU: oversubscribed OpenMP threads spin and crawl."""
    if jobs <= 1:
        before = torch.get_num_threads()
        try:
            results = []
            for i, plan in enumerate(plans):
                results.append(_train_with_threads(plan, threads))
                if on_done:
                    on_done(i, results[-1])
            return results
        finally:
            torch.set_num_threads(before)
    results: list[dict | None] = [None] * len(plans)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_with_threads, plan, threads): i for i, plan in enumerate(plans)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done:
                on_done(i, results[i])
    return results
