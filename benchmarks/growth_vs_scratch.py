"""Does growing save compute? Validation loss per training FLOP, and per wall-clock second, of three arms that see
the same Shakespeare tokens in the same order (BPE 2048, seq_len 128, batch 16, 320 steps = 655k tokens per arm;
for seed s every arm uses plan seed s, which fixes the data order, and its own init):

  scratch  the target model, 4 layers x 256, from step 0;
  msg      FLM-101B's Masked Structural Growth, most tokens spent small: 2x128 (50% of tokens) -> 4x128 (25%, depth)
           -> 4x256 (25%, width + heads + FFN), function-preserving, with linear mask ramps (the Trainer's grow_model);
  stack    a G_stack-style depth baseline: 2x256 (50%), then new layer i = copy of trained layer i mod 2, no masks.

One LR schedule for all arms: FLM's per-stage cosine (each stage warms up/restarts at its LR, min_lr at the very end),
with stage boundaries at 50% and 75% of the tokens for every arm (scratch and stack merely restart the LR where MSG
grows; this is the stronger scratch baseline: a single cosine ended at a worse loss, see --scratch-single-cosine).
The one base LR (muP, transferred across widths) is picked by a sweep of scratch runs on 25% of the tokens, seed 0
(1e-3, 2e-3, 4e-3; the lowest val loss wins; --sweep-tol T gives near-ties within T to the smaller LR).

Reported, mean +- std over seeds: speedup = FLOPs scratch needs to reach its final val loss / FLOPs the arm needs to
reach it (first crossing, linear interpolation between evals; if never, "reached" says so and final_gap gives the
distance); the same in wall-clock; each arm's final val loss against scratch's val loss at the arm's (smaller) total
FLOPs. Wall-clock is everything inside Trainer.fit (steps, growth surgery, stage-end checkpoints) minus evaluation,
which is timed and subtracted. The machine may be shared: the JSON records the load average.

    .venv/bin/python benchmarks/growth_vs_scratch.py            # full: LR sweep + 3 seeds x 3 arms
    .venv/bin/python benchmarks/growth_vs_scratch.py --quick    # CI smoke test: 1 seed, 16 small steps, no sweep
    .venv/bin/python benchmarks/growth_vs_scratch.py --replot benchmarks/results/growth_vs_scratch.json

Writes benchmarks/results/growth_vs_scratch.{json,png} (`--out`) and prints the JSON without its curves. Run
directories go under --workdir (default runs/bench/growth_vs_scratch) and are replaced on every run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from common import floats, log  # benchmarks/common.py (the script's own folder)

from flm.config import GrowthPlan, ModelConfig, flm_home
from flm.data import TokenizerSpec, prepare_dataset
from flm.model import GPT
from flm.train import Trainer

ARMS = ("scratch", "msg", "stack")
LABELS = {"scratch": "4x256", "msg": "MSG 2x128 > 4x128 > 4x256", "stack": "stacking 2x256 > 4x256"}
COLORS = {"scratch": "#555555", "msg": "#2a7f62", "stack": "#d0702a"}
HEAD_DIM = 64
MODEL = {"vocab_size": 2048, "seq_len": 128, "pos": "xpos", "xpos_scale_base": 512, "base_width": 128,
         "output_mult": 2.0, "init_std": 0.02}


# --- the depth-stacking baseline --------------------------------------------------------------------------------
def stack_layers(model: GPT, new_cfg: ModelConfig, operator_order=None, depth_placement="stack",
                 generator=None) -> GPT:
    """G_stack: new layer i is a copy of trained layer i mod L (2 -> 4 gives 0, 1, 0, 1); no masks, not
    function-preserving. Only depth may change."""
    old = model.cfg
    if model.growing:
        raise ValueError("stack_layers: the model still carries growth masks")
    if old.model_dump(exclude={"n_layer"}) != new_cfg.model_dump(exclude={"n_layer"}) or new_cfg.n_layer < old.n_layer:
        raise ValueError(f"stack_layers grows depth only: {old} -> {new_cfg}")
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("blocks.")}
    for name, t in model.state_dict().items():
        if name.startswith("blocks."):
            _, j, rest = name.split(".", 2)
            for i in range(int(j), new_cfg.n_layer, old.n_layer):
                state[f"blocks.{i}.{rest}"] = t.clone()
    return GPT.from_state(new_cfg, state)


# --- plans --------------------------------------------------------------------------------------------------------
def shape(n_layer: int, d_model: int) -> dict:
    return {**MODEL, "n_layer": n_layer, "d_model": d_model, "n_head": d_model // HEAD_DIM}


def split_steps(total: int, fractions: list[float]) -> list[int]:
    """Integer steps per stage, proportional to `fractions`, summing to `total`."""
    cum = [round(total * sum(fractions[: i + 1]) / sum(fractions)) for i in range(len(fractions))]
    steps = [b - a for a, b in zip([0, *cum[:-1]], cum, strict=True)]
    if min(steps) < 1:
        raise SystemExit(f"{fractions} of {total} steps leaves a stage without steps")
    return steps


def arm_stages(arm: str, args, lr: float) -> list[dict]:
    """The stages of one arm. Every arm trains args.steps steps of batch x seq_len tokens on one LR schedule: the
    stages split the steps at the same boundaries (--split) and each stage restarts its cosine at its LR. MSG grows
    at both boundaries, stacking at the first, scratch never (its later stages only restart the LR)."""
    tok = args.batch * MODEL["seq_len"]
    same = ("4x256", {"grow": {}})
    shapes = {"msg": [("2x128", {"model": shape(2, 128)}), ("4x128", {"grow": {"n_layer": 4}}),
                      ("4x256", {"grow": {"d_model": 256}})],
              "stack": [("2x256", {"model": shape(2, 256)}), ("4x256", {"grow": {"n_layer": 4}}), same],
              "scratch": [("4x256", {"model": shape(4, 256)}), same, same]}[arm]
    split = [1.0] if arm == "scratch" and args.scratch_single_cosine else args.split
    steps = split_steps(args.steps, split)
    lrs = {"scratch": None, "msg": args.msg_lrs, "stack": args.stack_lrs}[arm] or [lr] * len(steps)
    stages = []
    for k, ((name, model), n, stage_lr) in enumerate(zip(shapes[: len(steps)], steps, lrs, strict=True)):
        stage = {"name": name, **model, "tokens": n * tok, "lr": stage_lr, "batch_size": args.batch,
                 "warmup_samples": (args.warmup if k == 0 else args.rewarmup) * args.batch}
        if k:
            msg = arm == "msg"  # stacking copies layers on top: its optimizer moments follow the "stack" layout
            stage |= {"growth": "online", "ramp_steps": min(args.ramp, n) if msg else 0,
                      "depth_placement": args.msg_placement if msg else "stack"}
        stages.append(stage)
    return stages


def make_plan(name: str, stages: list[dict], seed: int, out: Path, data: Path, args) -> GrowthPlan:
    return GrowthPlan.model_validate({
        "name": name, "seed": seed, "min_lr": args.min_lr, "stages": stages,
        "train": {"data": str(data), "out": str(out), "log_every": args.eval_every, "eval_every": args.eval_every,
                  "eval_batches": args.eval_batches, "checkpoint_every": 10**9, "keep_checkpoints": 1,
                  "precision": "fp32", "device": "cpu"},
    })


# --- running ------------------------------------------------------------------------------------------------------
class TimedTrainer(Trainer):
    """The Trainer, with evaluation time measured so it can be left out of wall-clock."""

    eval_seconds = 0.0

    def evaluate(self) -> float:
        t = time.perf_counter()
        try:
            return super().evaluate()
        finally:
            self.eval_seconds += time.perf_counter() - t


def run_plan(plan: GrowthPlan, grow_fn=None) -> dict:
    """Train a plan from scratch; returns its eval curve and growth events, each stamped with train seconds
    (wall-clock since fit() began, minus evaluation)."""
    out = Path(plan.train.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: the Trainer would otherwise resume
    evals, events, cfgs = [], [], plan.model_configs()
    t0 = 0.0

    def stamp(record: dict) -> None:
        wall = time.perf_counter() - t0
        row = {**record, "wall_s": wall, "train_s": wall - trainer.eval_seconds}
        if record.get("event") == "growth":
            if cfgs[record["stage"]] == cfgs[record["stage"] - 1]:
                return  # a stage that only restarts the LR
            events.append({k: row[k] for k in ("step", "stage", "dloss", "params", "train_s")})
        elif "val_loss" in record:
            evals.append({k: row[k] for k in ("step", "stage", "tokens", "flops", "loss", "val_loss", "train_s")})

    trainer = TimedTrainer(plan, on_record=stamp, **({} if grow_fn is None else {"grow_fn": grow_fn}))
    t0 = time.perf_counter()
    trainer.fit()
    wall = time.perf_counter() - t0
    for ev in events:  # growth happens at a step boundary: same FLOPs as the eval at that step
        ev["flops"] = next(e["flops"] for e in evals if e["step"] == ev["step"])
    return {"evals": evals, "growth": events, "wall_s": wall, "eval_s": trainer.eval_seconds,
            "train_s": wall - trainer.eval_seconds, "final_val_loss": evals[-1]["val_loss"],
            "flops": evals[-1]["flops"], "tokens": evals[-1]["tokens"]}


def lr_sweep(args, data: Path) -> dict:
    """Scratch at the target size on a short run (its own full schedule) per LR, seed 0. The smallest LR whose val
    loss is within --sweep-tol of the best wins (default 0: the argmin). The optimal LR shrinks as the token horizon
    grows, so a tolerance gives a short run's near-tie to the smaller LR."""
    steps = max(8, round(args.steps * args.sweep_fraction))
    short = argparse.Namespace(**{**vars(args), "steps": steps, "warmup": min(args.warmup, steps // 4)})
    results = {}
    for lr in args.sweep_lrs:
        plan = make_plan("sweep", arm_stages("scratch", short, lr), 0, args.workdir / f"sweep-lr{lr:g}", data, args)
        results[lr] = run_plan(plan)["final_val_loss"]
        log(f"sweep lr={lr:g}: val_loss {results[lr]:.4f} after {steps} steps")
    best = min(results.values())
    chosen = min(lr for lr, v in results.items() if v <= best + args.sweep_tol)
    return {"steps": steps, "tokens": steps * args.batch * MODEL["seq_len"], "seed": 0, "tol": args.sweep_tol,
            "val_loss": {f"{k:g}": v for k, v in results.items()}, "best_lr": min(results, key=results.get),
            "chosen_lr": chosen}


# --- analysis -------------------------------------------------------------------------------------------------------
def reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """First x at which the curve gets down to `target` (linear interpolation between points), None if never."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = xs[i - 1], ys[i - 1]
            return x0 + (x - x0) * (y0 - target) / (y0 - y)
    return None


def interp(xs: list[float], ys: list[float], x: float) -> float | None:
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if x <= xs[i]:
            return ys[i - 1] + (ys[i] - ys[i - 1]) * (x - xs[i - 1]) / (xs[i] - xs[i - 1])
    return ys[-1]


def mean_std(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def analyse(runs: dict[str, dict[int, dict]]) -> tuple[dict, dict]:
    """Speedups to scratch's final loss (FLOPs and train seconds) and losses at equal FLOPs, per seed and summed."""
    speedup, equal = {}, {}
    for arm in (a for a in runs if a != "scratch"):
        rows = []
        for seed, run in runs[arm].items():
            ref = runs["scratch"][seed]
            target = ref["final_val_loss"]
            row = {"seed": seed, "target_val_loss": target}
            for axis in ("flops", "train_s"):
                ref_x = reach([e[axis] for e in ref["evals"]], [e["val_loss"] for e in ref["evals"]], target)
                x = reach([e[axis] for e in run["evals"]], [e["val_loss"] for e in run["evals"]], target)
                row[f"speedup_{axis}"] = None if x is None else ref_x / x
            row["reached"] = row["speedup_flops"] is not None
            row["gap"] = run["final_val_loss"] - target  # > 0: the arm ends above scratch's final loss
            rows.append(row)
        speedup[arm] = {"flops": mean_std([r["speedup_flops"] for r in rows]),
                        "wall": mean_std([r["speedup_train_s"] for r in rows]),
                        "reached": f"{sum(r['reached'] for r in rows)}/{len(rows)} seeds",
                        "final_gap": mean_std([r["gap"] for r in rows]), "per_seed": rows}
        eq = []
        for seed, run in runs[arm].items():
            ref = runs["scratch"][seed]
            at = interp([e["flops"] for e in ref["evals"]], [e["val_loss"] for e in ref["evals"]], run["flops"])
            eq.append({"seed": seed, "flops": run["flops"], "arm_val_loss": run["final_val_loss"],
                       "scratch_val_loss": at, "delta": None if at is None else run["final_val_loss"] - at})
        equal[arm] = {"flops": eq[0]["flops"], "flops_fraction_of_scratch": eq[0]["flops"] / runs["scratch"][
            eq[0]["seed"]]["flops"], "arm_val_loss": mean_std([e["arm_val_loss"] for e in eq]),
            "scratch_val_loss": mean_std([e["scratch_val_loss"] for e in eq]),
            "delta": mean_std([e["delta"] for e in eq]), "per_seed": eq}
    return speedup, equal


# --- plot -----------------------------------------------------------------------------------------------------------
def plot(runs: dict[str, dict[int, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    target = statistics.fmean(r["final_val_loss"] for r in runs["scratch"].values())
    for ax, axis, label in ((axes[0], "flops", "cumulative training FLOPs"),
                            (axes[1], "train_s", "wall-clock seconds (evaluation excluded)")):
        for arm, seeds in runs.items():
            c = COLORS[arm]
            for run in seeds.values():
                ax.plot([e[axis] for e in run["evals"]], [e["val_loss"] for e in run["evals"]], color=c, lw=0.6,
                        alpha=0.35)
            n = min(len(r["evals"]) for r in seeds.values())
            xs = [statistics.fmean(r["evals"][i][axis] for r in seeds.values()) for i in range(n)]
            ys = [statistics.fmean(r["evals"][i]["val_loss"] for r in seeds.values()) for i in range(n)]
            ax.plot(xs, ys, color=c, lw=2, label=f"{arm}: {LABELS[arm]} (mean of {len(seeds)})")
            first = next(iter(seeds.values()))
            for k in range(len(first["growth"])):
                gx = statistics.fmean(r["growth"][k][axis] for r in seeds.values())
                ax.axvline(gx, color=c, ls="--", lw=0.9, alpha=0.8)
        ax.axhline(target, color="k", ls=":", lw=0.8, label="scratch final val loss; dashed: growth")
        ax.set_xscale("log" if axis == "flops" else "linear")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation loss")
    lo = min(r["final_val_loss"] for s in runs.values() for r in s.values())
    axes[0].set_ylim(lo - 0.1, min(lo + 2.5, max(e["val_loss"] for s in runs.values() for r in s.values()
                                                  for e in r["evals"])))
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CI smoke test: 1 seed, few steps, no LR sweep")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=320, help="optimizer steps per arm (batch x 128 tokens each)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="scratch LR when there is no sweep")
    ap.add_argument("--sweep-lrs", type=floats, default=[1e-3, 2e-3, 4e-3], help="comma list; empty: no sweep")
    ap.add_argument("--sweep-tol", type=float, default=0.0, help="val-loss tie margin; ties go to the smaller LR")
    ap.add_argument("--sweep-fraction", type=float, default=0.25, help="sweep run length, as a fraction of --steps")
    ap.add_argument("--split", type=floats, default=[0.5, 0.25, 0.25],
                    help="token fractions of the 3 stages (MSG: 2x128, 4x128, 4x256; stack: 2x256, 4x256, 4x256)")
    ap.add_argument("--scratch-single-cosine", action="store_true", help="scratch without the stage LR restarts")
    ap.add_argument("--msg-lrs", type=floats, default=None, help="per-stage LRs (default: scratch's LR)")
    ap.add_argument("--stack-lrs", type=floats, default=None, help="per-stage LRs (default: scratch's LR)")
    ap.add_argument("--ramp", type=int, default=16, help="MSG mask ramp, optimizer steps")
    ap.add_argument("--msg-placement", choices=["stack", "interleave"], default="stack")
    ap.add_argument("--warmup", type=int, default=16, help="LR warmup of the first stage, steps")
    ap.add_argument("--rewarmup", type=int, default=0, help="LR warmup of later stages, steps")
    ap.add_argument("--min-lr", type=float, default=3e-5)
    ap.add_argument("--eval-every", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=6, help="fixed val batches of 8 x 128 tokens")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma list of arms (scratch is always run)")
    ap.add_argument("--data", type=Path, default=None, help="prepared dataset (default: $FLM_HOME/data/...)")
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench/growth_vs_scratch"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/growth_vs_scratch.json"))
    ap.add_argument("--replot", type=Path, default=None, help="only redraw the PNG next to this result JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch, args.sweep_lrs = 1, 16, 4, []
        args.eval_every, args.eval_batches, args.warmup, args.ramp = 4, 2, 2, 2
    args.arms = ["scratch", *[a for a in args.arms.split(",") if a in ARMS and a != "scratch"]]
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        plot_result(result, args.replot.with_suffix(".png"))
        return result
    t_start, load_start = time.perf_counter(), os.getloadavg()
    data = args.data or flm_home() / "data" / "shakespeare-bpe2048"
    if not (data / "manifest.json").is_file():  # the split the Trainer itself would make for a seed-0 plan
        log(f"preparing {data}")
        prepare_dataset("shakespeare", data, TokenizerSpec(kind="bpe", vocab_size=MODEL["vocab_size"]), seed=0)

    sweep = lr_sweep(args, data) if args.sweep_lrs else None
    lr = sweep["chosen_lr"] if sweep else args.lr
    runs: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for seed in range(args.seeds):
        for arm in args.arms:
            stages = arm_stages(arm, args, lr)
            plan = make_plan(f"{arm}-s{seed}", stages, seed, args.workdir / f"seed{seed}" / arm, data, args)
            run = run_plan(plan, stack_layers if arm == "stack" else None)
            run["stages"] = [{k: s[k] for k in ("name", "tokens", "lr") if k in s} for s in stages]
            runs[arm][seed] = run
            log(f"seed {seed} {arm:7s}: val_loss {run['final_val_loss']:.4f}  flops {run['flops']:.3g}  "
                f"train {run['train_s']:.0f}s (+{run['eval_s']:.0f}s eval)")

    speedup, equal = analyse(runs)
    result = {
        "benchmark": "growth_vs_scratch",
        "command": " ".join(["benchmarks/growth_vs_scratch.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("workdir", "out", "data", "replot")},
        "data": {"dir": str(data), "tokenizer": "bpe", "vocab_size": MODEL["vocab_size"],
                 "seq_len": MODEL["seq_len"], "tokens_per_arm": args.steps * args.batch * MODEL["seq_len"]},
        "lr_sweep": sweep,
        "arms": {arm: {"stages": next(iter(seeds.values()))["stages"],
                       "flops": next(iter(seeds.values()))["flops"],
                       "final_val_loss": mean_std([r["final_val_loss"] for r in seeds.values()]),
                       "train_s": mean_std([r["train_s"] for r in seeds.values()]),
                       "eval_s": mean_std([r["eval_s"] for r in seeds.values()]),
                       "growth_dloss": [mean_std([r["growth"][k]["dloss"] for r in seeds.values()])
                                        for k in range(len(next(iter(seeds.values()))["growth"]))]}
                 for arm, seeds in runs.items()},
        "speedup_to_scratch_final_loss": speedup,
        "equal_flops": equal,
        "wall_s_total": time.perf_counter() - t_start,
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "threads": torch.get_num_threads(),
    }
    summary = json.loads(json.dumps(result))
    result["curves"] = {arm: {str(seed): {"evals": r["evals"], "growth": r["growth"]} for seed, r in seeds.items()}
                        for arm, seeds in runs.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot_result(result, args.out.with_suffix(".png"))
    print(json.dumps(summary, indent=2))
    return result


def plot_result(result: dict, path: Path) -> None:
    """The PNG from a result JSON (also `--replot`)."""
    runs = {arm: {int(seed): {**r, "final_val_loss": r["evals"][-1]["val_loss"]} for seed, r in seeds.items()}
            for arm, seeds in result["curves"].items()}
    fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.2f}x ± {s['std']:.2f}"  # noqa: E731
    lines = "\n".join(f"{a}: {fmt(s['flops'])} in FLOPs, {fmt(s['wall'])} in wall-clock (reached on {s['reached']})"
                       for a, s in result["speedup_to_scratch_final_loss"].items())
    st = result["settings"]
    plot(runs, path, f"Shakespeare BPE-2048, target 4x256, {st['steps']} steps x {st['batch'] * MODEL['seq_len']} "
                     f"tokens per arm, {st['seeds']} seed(s); speedup to scratch's final val loss:\n{lines}")


if __name__ == "__main__":
    main()
