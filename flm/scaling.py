"""Loss prediction (FLM-101B, after μScaling): fit L(N) = a·N^b + c over a family of μP proxy widths trained with
the same hyperparameters to the same step, then extrapolate to a larger N. b < 0; c is the irreducible loss.

The proxy runs themselves (`proxy_plan`, `train_proxy`) are shared by the Ray Tune search (cluster/tune.py), the
benchmarks and `flm predict`: one process, one stage, the ordinary training loop.

    flm predict configs/search.yaml --hparams runs/tune/proxy-tiny/best.yaml [--widths 32,48,64,96] [--at 192]
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel
from scipy.optimize import OptimizeWarning, curve_fit

from flm.config import FLMConfigError, GrowthPlan, ProxyFamily, SearchedHparams, load_yaml, parse
from flm.flops import flops_per_token, param_count
from flm.train import Trainer, resolve_dataset


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
    with warnings.catch_warnings():  # 3 points fit 3 parameters exactly: no covariance, which we do not use
        warnings.simplefilter("ignore", OptimizeWarning)
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
    `min_lr_ratio` x lr; validation loss every `eval_every` steps (default: at the end only), training loss at least
    every 10 (a diverged run stops there: see train_proxy); no checkpoints besides the stage end."""
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
        "train": {"data": str(data), "tokenizer": tokenizer, "out": str(out), "log_every": min(10, eval_every or steps),
                  "eval_every": eval_every or steps, "eval_batches": eval_batches, "checkpoint_every": 10**9,
                  "keep_checkpoints": 1},
    }, f"proxy at width {width}")


class Diverged(RuntimeError):
    """A proxy run's loss stopped being finite."""


def train_proxy(plan: GrowthPlan, on_eval: Callable[[dict], None] | None = None) -> dict:
    """Train a proxy plan from scratch in this process (its run directory is replaced, its checkpoints dropped after).

    Returns {params, non_embedding_params, steps, tokens, val_loss, loss, seconds, cpu_seconds, diverged}; a run
    whose loss is no longer finite stops there with val_loss = inf. cpu_seconds (this process's CPU time) says what
    the run costs on an idle machine when wall seconds are inflated by other load. `on_eval(record)` sees every
    record that has a val_loss."""
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
    t0, cpu0 = time.perf_counter(), time.process_time()
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
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0, "diverged": diverged}


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
    cost = [flops_per_token(p.model_configs()[0]) * p.stages[0].tokens for p in plans]
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_with_threads, plans[i], threads): i  # longest first: the shortest wall-clock
                   for i in sorted(range(len(plans)), key=lambda i: -cost[i])}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done:
                on_done(i, results[i])
    return results


# --- loss prediction over a proxy family (`flm predict`, benchmarks/loss_prediction.py) ------------------------------
def proxy_data(proxy, base_dir: str | Path):
    """A `proxy:` entry as data: inline as it is, or the YAML at a path relative to `base_dir`."""
    if not isinstance(proxy, str):
        return proxy
    path = Path(proxy).expanduser()
    return load_yaml(path if path.is_absolute() else Path(base_dir) / path)


def load_family(path: str | Path) -> ProxyFamily:
    """A proxy family YAML, or any YAML whose `proxy:` holds or names one (a search config)."""
    data = load_yaml(path)
    if "proxy" in data:
        return parse(ProxyFamily, proxy_data(data["proxy"], Path(path).parent), f"{path}: proxy")
    return parse(ProxyFamily, data, str(path))


def family_hparams(family: ProxyFamily, best: SearchedHparams | None = None) -> dict:
    """lr, init_std and output_mult for the family's runs: a search's best point, or the family's own values."""
    if best is None:
        return {"lr": family.lr, "init_std": family.model.init_std, "output_mult": family.model.output_mult}
    if (best.base_width, best.parametrization) != (family.model.base_width, family.model.parametrization):
        raise FLMConfigError(f"hparams: searched at base_width {best.base_width} ({best.parametrization}), the "
                             f"family's is {family.model.base_width} ({family.model.parametrization}); μP "
                             f"hyperparameters transfer only at the same base width")
    return {"lr": best.lr, "init_std": best.init_std, "output_mult": best.output_mult}


def train_widths(family: ProxyFamily, widths: list[int], out_dir: str | Path, hparams: dict, *,
                 data: str = "shakespeare", seed: int = 0, eval_batches: int = 16, jobs: int = 1, threads: int = 1,
                 on_done: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Train the family at each width on the same tokens with the same hyperparameters (the dataset is prepared
    first, once); one dict per width: width, params, non_embedding_params, val_loss, ... (see train_proxy)."""
    def plans(data_dir: str) -> list[GrowthPlan]:
        return [proxy_plan(family, w, Path(out_dir) / f"w{w}", **hparams, data=data_dir, seed=seed,
                           eval_batches=eval_batches, name=f"proxy-w{w}") for w in widths]

    data_dir = str(resolve_dataset(plans(data)[0]).absolute())
    runs = train_proxies(plans(data_dir), jobs=jobs, threads=threads, on_done=on_done)
    return [{"width": w, **r} for w, r in zip(widths, runs, strict=True)]


def fit_runs(runs: list[dict], measure: str = "non_embedding_params") -> PowerLaw:
    """L(N) over trained widths; N is `measure` (non-embedding parameters by default, as in Kaplan et al.)."""
    if bad := [r["width"] for r in runs if not math.isfinite(r["val_loss"])]:
        raise FLMConfigError(f"widths {bad} diverged (loss not finite); lower the learning rate")
    return fit_power_law([r[measure] for r in runs], [r["val_loss"] for r in runs])


def plot_prediction(fitted: list[dict], law: PowerLaw, targets: list[dict], path: str | Path, title: str) -> Path:
    """Loss vs non-embedding parameters: the fitted widths, the fit, each target's prediction (and its actual loss
    when the target was trained too: key `actual`)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    sizes = [r["non_embedding_params"] for r in fitted] + [t["n"] for t in targets]
    n = np.geomspace(min(sizes) / 1.3, max(sizes) * 1.3, 200)
    ax.plot(n, law(n), color="#2a7f62", lw=1.5, label=f"fit L(N) = {law.a:.3g}·N^{law.b:.3f} + {law.c:.3f}")
    ax.scatter([r["non_embedding_params"] for r in fitted], [r["val_loss"] for r in fitted], color="#2a7f62",
               zorder=3, label=f"fitted: widths {', '.join(str(r['width']) for r in fitted)}")
    for r in fitted:
        ax.annotate(str(r["width"]), (r["non_embedding_params"], r["val_loss"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    for t in targets:
        ax.scatter([t["n"]], [t["predicted"]], marker="x", s=90, color="#d0702a", zorder=4,
                   label=f"predicted at width {t['width']}: {t['predicted']:.4f}")
        if t.get("actual") is not None:
            err = abs(t["predicted"] - t["actual"]) / t["actual"]
            ax.scatter([t["n"]], [t["actual"]], marker="*", s=140, color="k", zorder=4,
                       label=f"actual at width {t['width']}: {t['actual']:.4f} (error {100 * err:.2f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
