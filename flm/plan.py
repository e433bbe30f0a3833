"""The cost planner: what a growth plan costs in FLOPs, GPU-days and dollars, against training the final model
from scratch on the same tokens.

Time is pure compute: FLOPs / (GPUs x achieved FLOP/s per GPU). It leaves out what a FLOPs formula cannot see
(checkpointing, evaluation, restarts, the growth transitions themselves), so it reads below a wall-clock report.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, model_validator

from flm.config import GrowthPlan
from flm.flops import flops_per_token, param_count

SECONDS_PER_DAY = 86400.0


class Hardware(BaseModel):
    """Throughput assumptions. Per-stage TFLOP/s (as measured in the paper) or one MFU x peak for all stages."""

    gpus: int | None = Field(default=None, ge=1, description="None: each stage's layout tp*pp*dp")
    tflops_per_gpu: list[float] | None = Field(default=None, description="achieved TFLOP/s per GPU, per stage")
    mfu: float = Field(default=0.5, gt=0, le=1)
    peak_tflops: float = Field(default=312.0, gt=0, description="bf16 dense peak per GPU (A100/A800: 312)")
    price_per_gpu_hour: float = Field(default=1.0, ge=0, description="US$; the paper's ~$100K is ~99K GPU-hours")

    @model_validator(mode="after")
    def _positive(self):
        if self.tflops_per_gpu is not None and any(t <= 0 for t in self.tflops_per_gpu):
            raise ValueError("tflops_per_gpu: every value must be > 0")
        return self


class StageCost(BaseModel):
    name: str
    params: int
    tokens: int
    flops: float
    gpus: int
    tflops_per_gpu: float
    days: float
    gpu_days: float
    dollars: float


class PlanCost(BaseModel):
    stages: list[StageCost]
    total_tokens: int
    total_flops: float
    total_days: float
    total_dollars: float
    scratch_flops: float
    scratch_days: float
    scratch_dollars: float
    time_saving: float  # 1 - growth days / scratch days
    speedup: float  # scratch days / growth days


def plan_cost(plan: GrowthPlan, hw: Hardware) -> PlanCost:
    configs = plan.model_configs()
    n = len(plan.stages)
    if hw.tflops_per_gpu is not None and len(hw.tflops_per_gpu) not in (1, n):
        raise ValueError(f"tflops_per_gpu: give 1 or {n} values (one per stage), got {len(hw.tflops_per_gpu)}")

    def throughput(k: int) -> float:
        if hw.tflops_per_gpu is None:
            return hw.mfu * hw.peak_tflops
        return hw.tflops_per_gpu[k] if len(hw.tflops_per_gpu) == n else hw.tflops_per_gpu[0]

    def cost(flops: float, gpus: int, tflops: float) -> tuple[float, float, float]:
        days = flops / (gpus * tflops * 1e12) / SECONDS_PER_DAY
        return days, days * gpus, days * gpus * 24 * hw.price_per_gpu_hour

    stages = []
    for k, (stage, cfg) in enumerate(zip(plan.stages, configs, strict=True)):
        gpus = hw.gpus or stage.layout.gpus
        flops = flops_per_token(cfg) * stage.tokens
        days, gpu_days, dollars = cost(flops, gpus, throughput(k))
        stages.append(StageCost(name=stage.name or f"stage{k}", params=param_count(cfg), tokens=stage.tokens,
                                flops=flops, gpus=gpus, tflops_per_gpu=throughput(k), days=days,
                                gpu_days=gpu_days, dollars=dollars))
    tokens = sum(s.tokens for s in stages)
    scratch_flops = flops_per_token(configs[-1]) * tokens
    scratch_days, _, scratch_dollars = cost(scratch_flops, stages[-1].gpus, throughput(n - 1))
    total_days = sum(s.days for s in stages)
    return PlanCost(stages=stages, total_tokens=tokens, total_flops=sum(s.flops for s in stages),
                    total_days=total_days, total_dollars=sum(s.dollars for s in stages),
                    scratch_flops=scratch_flops, scratch_days=scratch_days, scratch_dollars=scratch_dollars,
                    time_saving=1 - total_days / scratch_days, speedup=scratch_days / total_days)
