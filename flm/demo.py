"""`flm demo`: the main job on this machine. Today: the paper's cost plan, and the tiny growth plan carried
through all its stages with a few training steps each, checking that every growth preserves the function and
that the optimizer state follows. Later stages of the product extend it (data, Ray Train, Serve, gateway)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flm import mup
from flm.config import load_plan
from flm.growth import MaskRamp, check_preservation, grow_model, transfer_adamw_state
from flm.model import GPT
from flm.plan import Hardware, plan_cost

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _optimizer(model: GPT, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(mup.param_groups(model, model.cfg, lr, 0.1), betas=(0.9, 0.95))


def growth_sanity(plan_path: Path, steps_per_stage: int = 20, seed: int = 0) -> list[dict]:
    """Train each stage a few steps on random tokens, grow, and measure what the growth changed."""
    plan = load_plan(plan_path)
    configs = plan.model_configs()
    gen = torch.Generator().manual_seed(seed)
    model = GPT(configs[0], generator=gen)
    opt = _optimizer(model, plan.stages[0].lr)
    cfg0 = configs[0]
    batch = torch.randint(0, cfg0.vocab_size, (4, cfg0.seq_len + 1), generator=gen)
    x, y = batch[:, :-1], batch[:, 1:]
    report, step, ramp = [], 0, None
    for k, stage in enumerate(plan.stages):
        if k > 0:
            grown = grow_model(model, configs[k], stage.operator_order, stage.depth_placement, gen)
            kept = check_preservation(model, grown, x, y)
            new_opt = _optimizer(grown, stage.lr)
            transfer_adamw_state(opt, model, new_opt, grown, stage.depth_placement)
            model, opt, ramp = grown, new_opt, MaskRamp(step, stage.ramp_steps)
            report.append({"stage": k, "growth_max_abs_dlogits": kept.max_abs, "growth_dloss": kept.dloss,
                           "params": model.num_params(), "masks": len(model.growth_masks())})
        for _ in range(max(steps_per_stage, stage.ramp_steps + 4)):  # finish the ramp in the stage
            if ramp is not None:
                ramp.apply(model, step)
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        report.append({"stage": k, "step": step, "loss": loss.item(), "masks_left": len(model.growth_masks())})
    return report


def run_demo(out: str) -> None:
    from flm.cli import console

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    hw = Hardware(gpus=192, tflops_per_gpu=[162, 160, 165])
    cost = plan_cost(load_plan(CONFIGS / "flm-101b.yaml"), hw)
    console.print(f"[bold]FLM-101B plan[/bold]: {cost.total_days:.2f} days by growth vs {cost.scratch_days:.2f} "
                  f"from scratch on 192 GPUs: {cost.time_saving:.1%} saved ({cost.speedup:.2f}x)")
    report = growth_sanity(CONFIGS / "tiny.yaml")
    for row in report:
        console.print(row)
    (out_dir / "demo.json").write_text(json.dumps({"plan": cost.model_dump(), "growth": report}, indent=2))
    console.print(f"wrote {out_dir / 'demo.json'}")
