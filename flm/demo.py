"""`flm demo`: the main job on this machine, end to end. Today: the paper's cost plan, then the tiny 3-stage growth
plan trained on Shakespeare (data prepared on first use), with every growth checked for function preservation.
Later parts of the product extend it (Ray Train, Serve, the gateway)."""

from __future__ import annotations

import json
from pathlib import Path

from flm.config import GrowthPlan, load_plan, parse
from flm.plan import Hardware, plan_cost
from flm.train import Trainer, read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run_demo(out: str) -> None:
    from flm.cli import console

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cost = plan_cost(load_plan(CONFIGS / "flm-101b.yaml"), Hardware(gpus=192, tflops_per_gpu=[162, 160, 165]))
    console.print(f"[bold]FLM-101B plan[/bold]: {cost.total_days:.2f} days by growth vs {cost.scratch_days:.2f} "
                  f"from scratch on 192 GPUs: {cost.time_saving:.1%} saved ({cost.speedup:.2f}x)")

    tiny = load_plan(CONFIGS / "tiny.yaml")
    tiny = parse(GrowthPlan, {**tiny.model_dump(), "train": {**tiny.train.model_dump(), "out": str(out_dir / "tiny")}})
    console.print(f"[bold]tiny growth plan[/bold] -> {out_dir / 'tiny'} (resumes if interrupted)")

    def show(record: dict) -> None:
        if record.get("event") == "growth":
            console.print(f"  grew into stage {record['stage']} at step {record['step']}: "
                          f"{record['params'] / 1e6:.2f}M params, |Δloss| = {record['dloss']:.1e}")
        elif "val_loss" in record:
            console.print(f"  step {record['step']:4d}  stage {record['stage']}  loss {record['loss']:.3f}  "
                          f"val {record['val_loss']:.3f}  {record['tokens_per_s']:,.0f} tok/s")

    Trainer(tiny, on_record=show).fit()
    records = read_metrics(out_dir / "tiny")
    growth = [r for r in records if r.get("event") == "growth"]
    final = [r for r in records if "val_loss" in r][-1]
    summary = {"plan": cost.model_dump(), "tiny": {"final": final, "growth_events": growth}}
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2))
    console.print(f"final validation loss {final['val_loss']:.3f} after {final['tokens']:,} tokens; "
                  f"wrote {out_dir / 'demo.json'}")
