"""Can the loss of a wider model be predicted from narrower ones? FLM-101B's (and μScaling's) loss prediction on our
μP proxy family: train every width of the family with the same hyperparameters on the same tokens, fit
L(N) = a·N^b + c (N = non-embedding parameters, flm/scaling.py) on all widths but the last, and predict the last,
which is 2x the widest fitted one.

The family is the `proxy:` of configs/search.yaml (4 layers, head_dim 16, base width 64; widths 32, 48, 64, 96 fitted,
192 predicted; 200 steps of 16 x 128 Shakespeare BPE-2048 tokens each); the hyperparameters are a search's best.yaml
(`flm tune configs/search.yaml`, then --hparams) or the family's own. Reported: |predicted − actual| / actual (goal
≤ 2%; μScaling reports 0.2% at 1.45B) and, for scale, the error of the no-extrapolation guess "the widest fitted
model's loss". The final validation loss is measured on --eval-batches fixed batches of 8 x seq_len tokens.

    .venv/bin/python benchmarks/loss_prediction.py --hparams runs/tune/proxy-tiny/best.yaml
    .venv/bin/python benchmarks/loss_prediction.py --quick      # CI smoke test: a 2-layer micro family, seconds

Writes benchmarks/results/loss_prediction.{json,png} (--out) and prints the JSON. Run directories go under --workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from cluster.tune import load_search
from flm.config import ProxyFamily, SearchedHparams, parse
from flm.data import Manifest
from flm.scaling import fit_power_law, proxy_plan, train_proxies
from flm.train import resolve_dataset

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", type=Path, default=ROOT / "configs" / "search.yaml", help="its proxy family is used")
    ap.add_argument("--hparams", type=Path, help="best.yaml of a search (default: the family's lr/init_std/mult)")
    ap.add_argument("--widths", type=ints, help="comma list; the last is predicted (default: the family's widths)")
    ap.add_argument("--tokens", type=int, help="training tokens per width (default: the family's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2, help="widths trained at once, one process each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--data", help="prepared dataset dir (default: the search's data)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench/loss_prediction"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_prediction.json")
    ap.add_argument("--quick", action="store_true", help="CI smoke test: 2 layers x 16..96 (head_dim 8), seq 32, 20 steps")
    return ap.parse_args(argv)


def family_for(args) -> tuple[ProxyFamily, str]:
    """The proxy family and dataset the benchmark trains (--quick: a micro version of the family)."""
    search = load_search(args.search)
    family, data = search.proxy, args.data or search.data
    if args.quick:
        model = {**family.model.model_dump(), "n_layer": 2, "seq_len": 32, "base_width": 32, "head_dim": 8,
                 "n_head": family.model.d_model // 8}
        family = parse(ProxyFamily, {**family.model_dump(), "model": model, "widths": [16, 24, 32, 48, 96],
                                     "batch_size": 8, "tokens": 20 * 8 * 32})
        args.eval_batches = min(args.eval_batches, 4)
    if args.widths:
        family = parse(ProxyFamily, {**family.model_dump(), "widths": args.widths}, "--widths")
    return family, data


def hparams_for(args, family: ProxyFamily) -> dict:
    if args.hparams is None:
        return {"lr": family.lr, "init_std": family.model.init_std, "output_mult": family.model.output_mult,
                "source": "the proxy family's own"}
    best = parse(SearchedHparams, yaml.safe_load(args.hparams.read_text()), str(args.hparams))
    if best.base_width != family.model.base_width and not args.quick:
        raise SystemExit(f"{args.hparams}: searched at base_width {best.base_width}, the family's is "
                         f"{family.model.base_width}")
    return {"lr": best.lr, "init_std": best.init_std, "output_mult": best.output_mult, "source": str(args.hparams)}


def predict(runs: list[dict], measure: str) -> dict:
    """Fit on every run but the last, predict the last."""
    fitted, target = runs[:-1], runs[-1]
    law = fit_power_law([r[measure] for r in fitted], [r["val_loss"] for r in fitted])
    predicted = float(law(target[measure]))
    return {"n_measure": measure, "fitted_widths": [r["width"] for r in fitted], "a": law.a, "b": law.b, "c": law.c,
            "width": target["width"], "n": target[measure], "predicted": predicted, "actual": target["val_loss"],
            "rel_error": abs(predicted - target["val_loss"]) / target["val_loss"],
            "residuals": [r["val_loss"] - float(law(r[measure])) for r in fitted]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    family, data = family_for(args)
    hp = hparams_for(args, family)
    widths = family.widths
    if len(widths) < 4:
        raise SystemExit(f"--widths: need at least 3 fitted widths and 1 predicted, got {widths}")

    def plan(width: int, data_dir: str):
        return proxy_plan(family, width, args.workdir / f"w{width}", lr=hp["lr"], init_std=hp["init_std"],
                          output_mult=hp["output_mult"], data=data_dir, seed=args.seed,
                          eval_batches=args.eval_batches, name=f"loss-prediction-w{width}")

    data_dir = str(resolve_dataset(plan(widths[0], data)).absolute())  # prepared once, before the workers start
    if args.quick:
        vocab = Manifest.load(data_dir).vocab_size
        model = {**family.model.model_dump(), "vocab_size": vocab}
        family = parse(ProxyFamily, {**family.model_dump(), "model": model})
    plans = [plan(w, data_dir) for w in widths]
    log(f"training widths {widths} ({plans[0].steps(0)} steps of {family.batch_size} x {family.model.seq_len} tokens "
        f"each), lr {hp['lr']:g}, init_std {hp['init_std']:g}, output_mult {hp['output_mult']:g}; {args.jobs} jobs")
    runs = train_proxies(plans, jobs=args.jobs, threads=args.threads,
                         on_done=lambda i, r: log(f"width {widths[i]}: val_loss {r['val_loss']:.4f} "
                                                  f"({r['seconds']:.0f} s)"))
    runs = [{"width": w, **r} for w, r in zip(widths, runs, strict=True)]
    if any(r["diverged"] for r in runs):
        raise SystemExit(f"a width diverged: {[(r['width'], r['val_loss']) for r in runs]}; lower the LR")

    main_fit = predict(runs, "non_embedding_params")
    target = runs[-1]
    baseline = runs[-2]["val_loss"]
    result = {
        "benchmark": "loss_prediction",
        "command": " ".join(["benchmarks/loss_prediction.py", *(sys.argv[1:] if argv is None else argv)]),
        "family": family.model_dump(mode="json"),
        "hparams": hp,
        "data": data_dir,
        "steps": plans[0].steps(0),
        "tokens_per_width": plans[0].stages[0].tokens,
        "eval_tokens": args.eval_batches * 8 * family.model.seq_len,
        "runs": runs,
        "prediction": {**main_fit, "goal": 0.02, "met": main_fit["rel_error"] <= 0.02,
                       "predicted_width_is_2x_widest_fitted": target["width"] == 2 * runs[-2]["width"]},
        "prediction_total_params": predict(runs, "params"),
        "baseline_widest_fitted": {"predicted": baseline, "rel_error": abs(baseline - target["val_loss"])
                                   / target["val_loss"]},
        "wall_s": time.perf_counter() - t_start,
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "jobs": args.jobs, "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    p, runs = result["prediction"], result["runs"]
    fitted, target = runs[:-1], runs[-1]
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    n = np.geomspace(fitted[0]["non_embedding_params"] / 1.3, target["non_embedding_params"] * 1.3, 200)
    law = p["a"] * np.power(n, p["b"]) + p["c"]
    ax.plot(n, law, color="#2a7f62", lw=1.5,
            label=f"fit L(N) = {p['a']:.3g}·N^{p['b']:.3f} + {p['c']:.3f}")
    ax.scatter([r["non_embedding_params"] for r in fitted], [r["val_loss"] for r in fitted], color="#2a7f62",
               zorder=3, label=f"fitted: widths {', '.join(str(r['width']) for r in fitted)}")
    ax.scatter([p["n"]], [p["predicted"]], marker="x", s=90, color="#d0702a", zorder=4,
               label=f"predicted at width {p['width']}: {p['predicted']:.4f}")
    ax.scatter([p["n"]], [p["actual"]], marker="*", s=140, color="k", zorder=4,
               label=f"actual: {p['actual']:.4f} (error {100 * p['rel_error']:.2f}%)")
    for r in runs:
        ax.annotate(f"{r['width']}", (r["non_embedding_params"], r["val_loss"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"final validation loss after {result['steps']} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fam = result["family"]["model"]
    ax.set_title(f"μP proxy family, {fam['n_layer']} layers, head_dim {fam['head_dim']}, "
                 f"{result['tokens_per_width']:,} tokens per width; goal ≤ 2%", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
