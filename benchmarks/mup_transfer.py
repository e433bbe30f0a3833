"""Does the best learning rate transfer across width? The μP paper's central plot on our proxy family: an LR sweep at
the smallest width and at 4x that width, under μP and under standard parametrisation (SP), everything else fixed
(init_std and output_mult from --hparams or the family; same data, seed and tokens).

base_width is the small width, so there μP and SP are the same model and one sweep serves both; at 4x, μP divides
the init variance and the matrix LR by the width multiplier and multiplies the logits by output_mult / w, while SP
keeps them (GPT-2-style fixed init std). The claim checked: the best LR at the small width is still the best at 4x
(within one step of the geometric LR grid) under μP, and is not under SP. Also reported: the regret, i.e. how much
higher the 4x model's loss is at the small width's best LR than at its own best.

    .venv/bin/python benchmarks/mup_transfer.py            # widths 32 -> 128, 7 LRs, 100 steps of 8 x 128 tokens
    .venv/bin/python benchmarks/mup_transfer.py --quick    # CI smoke test: 2 layers, 16 -> 64, 3 LRs, seconds

Writes benchmarks/results/mup_transfer.{json,png} (--out) and prints the JSON. Run directories go under --workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import yaml
from common import floats, log  # benchmarks/common.py (the script's own folder)

from cluster.tune import load_search
from flm.config import ProxyFamily, SearchedHparams, parse
from flm.data import Manifest
from flm.scaling import proxy_plan, train_proxies
from flm.train import resolve_dataset

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ("mup", "sp")
LABELS = {"mup": "μP", "sp": "standard parametrisation"}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", type=Path, default=ROOT / "configs" / "search.yaml", help="its proxy family is used")
    ap.add_argument("--hparams", type=Path, help="best.yaml of a search: init_std and output_mult (default: family)")
    ap.add_argument("--width", type=int, help="the small width (default: the family's smallest)")
    ap.add_argument("--scale", type=int, default=4, help="the large width is scale x the small one")
    ap.add_argument("--lrs", type=floats, default=[1e-3 * 2**k for k in range(7)],
                    help="geometric LR grid, comma list (default 1e-3 .. 6.4e-2 in steps of 2x)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (of the family's seq_len)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once, one process each")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--data", help="prepared dataset dir (default: the search's data)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench/mup_transfer"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mup_transfer.json")
    ap.add_argument("--quick", action="store_true", help="CI smoke test: 2 layers, 16 -> 64, 3 LRs, 20 steps")
    ap.add_argument("--reanalyse", type=Path, help="recompute the verdict and PNG of this result JSON, no training")
    args = ap.parse_args(argv)
    if args.quick:
        args.lrs, args.steps, args.eval_batches = [4e-3, 1.6e-2, 6.4e-2], 20, min(args.eval_batches, 4)
    args.lrs = sorted(args.lrs)
    ratios = {round(b / a, 6) for a, b in zip(args.lrs, args.lrs[1:], strict=False)}
    if len(args.lrs) < 3 or len(ratios) != 1 or min(args.lrs) <= 0:
        raise SystemExit(f"--lrs: need >= 3 positive LRs in a geometric progression, got {args.lrs}")
    return args


def family_for(args) -> tuple[ProxyFamily, str]:
    """The family at base width = the small width (--quick: a micro version of it)."""
    search = load_search(args.search)
    family, data = search.proxy, args.data or search.data
    model = family.model.model_dump()
    width = args.width or (16 if args.quick else min(family.widths))
    if args.quick:
        model |= {"n_layer": 2, "seq_len": 32}
    if args.hparams:
        best = parse(SearchedHparams, yaml.safe_load(args.hparams.read_text()), str(args.hparams))
        model |= {"init_std": best.init_std, "output_mult": best.output_mult}
    model |= {"base_width": width}
    return parse(ProxyFamily, {**family.model_dump(), "model": model, "widths": [width, args.scale * width],
                               "batch_size": args.batch, "tokens": args.steps * args.batch * model["seq_len"]},
                 "family"), data


def best_lr(curve: dict[float, float]) -> float | None:
    finite = {lr: v for lr, v in curve.items() if math.isfinite(v)}
    return min(finite, key=finite.get) if finite else None


def interpolated_best_lr(curve: dict[float, float]) -> float | None:
    """The vertex of the parabola in log(lr) through the best grid point and its two neighbours: a finer optimum
    than the grid's argmin (None when the best point is at the grid's edge or a neighbour diverged)."""
    lrs = sorted(curve)
    b = best_lr(curve)
    i = lrs.index(b) if b is not None else 0
    if b is None or i in (0, len(lrs) - 1):
        return None
    y0, y1, y2 = (curve[lrs[j]] for j in (i - 1, i, i + 1))
    if not all(math.isfinite(y) for y in (y0, y2)):
        return None
    offset = (y0 - y2) / (2 * (y0 - 2 * y1 + y2))  # in grid steps from the best point, within (-0.5, 0.5]
    return b * (lrs[i + 1] / b) ** offset


def analyse(runs: list[dict], small: int, large: int, lrs: list[float]) -> tuple[dict, dict]:
    """Per parametrisation: the two LR curves, the best LR at each width, its shift in grid steps (argmin and
    interpolated), and the regret at 4x of using the small width's best LR."""
    loss = {(r["width"], r["parametrization"], r["lr"]): r["val_loss"] for r in runs}
    step = lrs[1] / lrs[0]
    sweeps, verdict = {}, {}
    for p in PARAMS:
        curves = {str(small): {lr: loss[small, "mup", lr] for lr in lrs},  # μP = SP at base_width
                  str(large): {lr: loss[large, p, lr] for lr in lrs}}
        b_small, b_large = best_lr(curves[str(small)]), best_lr(curves[str(large)])
        shift = None if None in (b_small, b_large) else round(math.log(b_large / b_small) / math.log(step))
        i_small, i_large = (interpolated_best_lr(curves[w]) for w in (str(small), str(large)))
        i_shift = None if None in (i_small, i_large) else math.log(i_large / i_small) / math.log(step)
        at_transferred = curves[str(large)][b_small] if b_small is not None else math.nan
        sweeps[p] = {w: {f"{lr:g}": v for lr, v in c.items()} for w, c in curves.items()}
        verdict[p] = {"best_lr_small": b_small, "best_lr_large": b_large, "shift_grid_steps": shift,
                      "transfers": shift is not None and abs(shift) <= 1,
                      "interpolated_best_lr_small": i_small, "interpolated_best_lr_large": i_large,
                      "interpolated_shift_grid_steps": i_shift,
                      "large_loss_at_small_best_lr": at_transferred,
                      "large_best_loss": curves[str(large)].get(b_large, math.nan),
                      "regret": at_transferred - curves[str(large)].get(b_large, math.nan)}
    return sweeps, verdict


def reanalyse(path: Path) -> dict:
    """Recompute the verdict and redraw the PNG of a result JSON from its runs (no training)."""
    result = json.loads(path.read_text())
    result["sweeps"], result["verdict"] = analyse(result["runs"], *result["widths"], result["lrs"])
    result["claim_holds"] = result["verdict"]["mup"]["transfers"] and not result["verdict"]["sp"]["transfers"]
    path.write_text(json.dumps(result, indent=2))
    plot(result, path.with_suffix(".png"))
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.reanalyse:
        result = reanalyse(args.reanalyse)
        print(json.dumps(result, indent=2))
        return result
    t_start, load_start = time.perf_counter(), os.getloadavg()
    family, data = family_for(args)
    small, large = family.widths

    def plan(width: int, param: str, lr: float, data_dir: str):
        return proxy_plan(family, width, args.workdir / f"{param}-w{width}-lr{lr:g}", lr=lr, parametrization=param,
                          data=data_dir, seed=args.seed, eval_batches=args.eval_batches, name="mup-transfer")

    data_dir = str(resolve_dataset(plan(small, "mup", args.lrs[0], data)).absolute())
    if args.quick:  # the micro family on whatever small dataset the test gives
        vocab = Manifest.load(data_dir).vocab_size
        model = {**family.model.model_dump(), "vocab_size": vocab}
        family = parse(ProxyFamily, {**family.model_dump(), "model": model})
    # at the small width (= base_width) μP and SP are the same model: one sweep serves both
    jobs = [(small, "mup", lr) for lr in args.lrs] + [(large, p, lr) for p in PARAMS for lr in args.lrs]
    log(f"{len(jobs)} runs: widths {small} and {large}, LRs {args.lrs}, {args.steps} steps of {family.batch_size} x "
        f"{family.model.seq_len} tokens, init_std {family.model.init_std:g}, output_mult "
        f"{family.model.output_mult:g}; {args.jobs} jobs")
    results = train_proxies([plan(*j, data_dir) for j in jobs], jobs=args.jobs, threads=args.threads,
                            on_done=lambda i, r: log(f"width {jobs[i][0]} {jobs[i][1]} lr {jobs[i][2]:g}: "
                                                     f"val_loss {r['val_loss']:.4f} ({r['seconds']:.0f} s)"))
    runs = [{"width": w, "parametrization": p, "lr": lr, **r} for (w, p, lr), r in zip(jobs, results, strict=True)]
    sweeps, verdict = analyse(runs, small, large, args.lrs)
    result = {
        "benchmark": "mup_transfer",
        "command": " ".join(["benchmarks/mup_transfer.py", *(sys.argv[1:] if argv is None else argv)]),
        "family": family.model_dump(mode="json"),
        "widths": [small, large], "lrs": args.lrs, "grid_step": args.lrs[1] / args.lrs[0], "steps": args.steps,
        "tokens_per_run": args.steps * family.batch_size * family.model.seq_len,
        "eval_batches": args.eval_batches, "eval_tokens": args.eval_batches * 8 * family.model.seq_len,
        "data": data_dir,
        "sweeps": sweeps, "verdict": verdict,
        "claim_holds": verdict["mup"]["transfers"] and not verdict["sp"]["transfers"],
        "runs": runs,
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

    small, large = (str(w) for w in result["widths"])
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    finite = [v for s in result["sweeps"].values() for c in s.values() for v in c.values() if math.isfinite(v)]
    for ax, p in zip(axes, PARAMS, strict=True):
        v = result["verdict"][p]
        for w, color in ((small, "#888888"), (large, "#2a7f62" if p == "mup" else "#d0702a")):
            curve = {float(lr): x for lr, x in result["sweeps"][p][w].items()}
            lrs = [lr for lr in sorted(curve) if math.isfinite(curve[lr])]
            ax.plot(lrs, [curve[lr] for lr in lrs], marker="o", color=color, label=f"width {w}")
            b = v["best_lr_small" if w == small else "best_lr_large"]
            if b is not None:
                ax.scatter([b], [curve[b]], marker="*", s=200, color=color, zorder=4, edgecolor="k")
            fine = v["interpolated_best_lr_small" if w == small else "interpolated_best_lr_large"]
            if fine is not None:
                ax.axvline(fine, color=color, ls="--", lw=1)
            for lr in sorted(curve):
                if not math.isfinite(curve[lr]):
                    ax.annotate("diverged", (lr, max(finite)), fontsize=7, color=color, rotation=90)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (base, at base_width)")
        shift, fine = v["shift_grid_steps"], v["interpolated_shift_grid_steps"]
        ax.set_title(f"{LABELS[p]}: best LR {v['best_lr_small']:g} -> {v['best_lr_large']:g} "
                     f"({'n/a' if shift is None else f'{shift:+d}'} grid steps), regret {v['regret']:.3f}\n"
                     f"interpolated optimum (dashed): {'n/a' if fine is None else f'{fine:+.2f}'} grid steps",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"final validation loss after {result['steps']} steps")
    if finite:
        axes[0].set_ylim(min(finite) - 0.05, min(max(finite), min(finite) + 2.0) + 0.05)
    fig.suptitle(f"LR transfer from width {small} to {large}, {result['steps']} steps (stars: best grid LR; dashed: "
                 f"parabola vertex in log LR; at width {small} μP = SP)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
