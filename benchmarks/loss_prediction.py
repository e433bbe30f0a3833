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

import yaml
from common import ints, log  # benchmarks/common.py (the script's own folder)

from cluster.tune import load_search
from flm.config import ProxyFamily, SearchedHparams, parse
from flm.data import Manifest
from flm.scaling import PowerLaw, family_hparams, fit_runs, plot_prediction, train_widths

ROOT = Path(__file__).resolve().parents[1]


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
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke test: 2 layers x 16..96 (head_dim 8), seq 32, 20 steps; ignores --hparams")
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
        if args.data:  # the micro model gets the small dataset's vocabulary
            model["vocab_size"] = Manifest.load(args.data).vocab_size
            family = parse(ProxyFamily, {**family.model_dump(), "model": model})
        args.eval_batches = min(args.eval_batches, 4)
    if args.widths:
        family = parse(ProxyFamily, {**family.model_dump(), "widths": args.widths}, "--widths")
    if args.tokens:
        family = parse(ProxyFamily, {**family.model_dump(), "tokens": args.tokens}, "--tokens")
    return family, data


def predict(runs: list[dict], measure: str) -> dict:
    """Fit on every run but the last, predict the last."""
    fitted, target = runs[:-1], runs[-1]
    law = fit_runs(fitted, measure)
    predicted = float(law(target[measure]))
    return {"n_measure": measure, "fitted_widths": [r["width"] for r in fitted], "a": law.a, "b": law.b, "c": law.c,
            "width": target["width"], "n": target[measure], "predicted": predicted, "actual": target["val_loss"],
            "rel_error": abs(predicted - target["val_loss"]) / target["val_loss"],
            "residuals": [r["val_loss"] - float(law(r[measure])) for r in fitted]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start, load_start = time.perf_counter(), os.getloadavg()
    family, data = family_for(args)
    best = parse(SearchedHparams, yaml.safe_load(args.hparams.read_text()), str(args.hparams)) if args.hparams else None
    hp = family_hparams(family, None if args.quick else best)  # the micro family has its own base width
    widths = family.widths
    if len(widths) < 4:
        raise SystemExit(f"--widths: need at least 3 fitted widths and 1 predicted, got {widths}")
    steps = family.tokens // (family.batch_size * family.model.seq_len)
    log(f"training widths {widths} ({steps} steps of {family.batch_size} x {family.model.seq_len} tokens each), "
        f"lr {hp['lr']:g}, init_std {hp['init_std']:g}, output_mult {hp['output_mult']:g}; {args.jobs} jobs")
    runs = train_widths(family, widths, args.workdir, hp, data=data, seed=args.seed, eval_batches=args.eval_batches,
                        jobs=args.jobs, threads=args.threads,
                        on_done=lambda i, r: log(f"width {widths[i]}: val_loss {r['val_loss']:.4f} "
                                                 f"({r['seconds']:.0f} s)"))
    main_fit = predict(runs, "non_embedding_params")
    target = runs[-1]
    baseline = runs[-2]["val_loss"]
    result = {
        "benchmark": "loss_prediction",
        "command": " ".join(["benchmarks/loss_prediction.py", *(sys.argv[1:] if argv is None else argv)]),
        "family": family.model_dump(mode="json"),
        "hparams": {**hp, "source": str(args.hparams) if best else "the proxy family's own"},
        "steps": steps,
        "tokens_per_width": steps * family.batch_size * family.model.seq_len,
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
    p = main_fit
    fam = family.model
    plot_prediction(runs[:-1], PowerLaw(a=p["a"], b=p["b"], c=p["c"]),
                    [{"width": p["width"], "n": p["n"], "predicted": p["predicted"], "actual": p["actual"]}],
                    args.out.with_suffix(".png"),
                    f"μP proxy family, {fam.n_layer} layers, head_dim {fam.head_dim}, "
                    f"{result['tokens_per_width']:,} tokens per width; goal ≤ 2%")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
