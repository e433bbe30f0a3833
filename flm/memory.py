"""The memory planner: bytes per GPU of each stage under `backend: fsdp` (FSDP2 x TP, flm/parallelize.py), and the
dry run that proves the estimate by building the real sharding.

Per GPU, for a stage of L layers, width h, FFN f, attention width a, vocabulary V, on tp x dp GPUs:
- parameters: fp32 masters, sharded: (L·block_tp / tp + replicated) / dp values x 4 bytes, where block_tp are the
  weights TP splits (q, k, v, attention out, FFN in and out, and the column-parallel biases) and `replicated` the
  rest (embedding, LayerNorms, row-parallel biases); gradients the same (fp32 shards); AdamW 2 x 4 bytes more;
- gathered: what FSDP2 holds unsharded at once: the root unit (embedding, final LayerNorm) and two blocks in the
  compute dtype (bf16 on GPUs), plus the fp32 gradients of one block and of the embedding before they are
  reduce-scattered;
- activations (Korthikanti et al. 2022, TP without sequence parallelism, fused SDPA so no s² term), bytes at
  2-byte activations for micro batch b and sequence s: s·b·h·(10 + 24/tp) per layer; with full activation
  checkpointing only each block's input (2·s·b·h) stays per layer, plus one layer's working set during its
  recompute; and the logits: s·b·V·(2 + 4 + 4) (compute-dtype logits, fp32 copy, its gradient).
Everything scales with the activation width in bytes: fp32 compute doubles the activation and gathered terms.

`dry_run` builds each stage's GPT on the meta device, applies `parallelize` (the training code, not a copy) on a
fake process group of the stage's world size, and reads the shard shapes rank 0 holds: the first rank's shards are
the largest where FSDP pads an uneven split.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from flm.config import GrowthPlan, ModelConfig

GIB = 1024**3


class StageMemory(BaseModel):
    """Bytes per GPU of one stage (estimates, and with the dry run the measured sharded states)."""

    name: str
    tp: int
    dp: int
    micro_batch: int
    seq_len: int
    activation_checkpointing: bool
    params: int
    grads: int
    optimizer: int
    gathered: int
    activations: int
    activations_without_ac: int
    activations_with_ac: int
    total: int
    gpu_mem: int
    fits: bool
    measured_states: int | None = None  # params + grads + optimizer from the dry run's shard shapes
    states_error: float | None = None  # |estimate - measured| / measured


def tp_split_params(cfg: ModelConfig) -> tuple[int, int]:
    """(values TP splits, values replicated over tp) of the whole model."""
    d, a, f, b = cfg.d_model, cfg.attn_dim, cfg.d_ffn, int(cfg.bias)
    split = cfg.n_layer * (3 * a * d + 3 * a * b + a * d + f * d + f * b + f * d)
    replicated = cfg.n_layer * (2 * d * (1 + b) + 2 * d * b) + d * (1 + b)
    replicated += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return split, replicated


def activation_bytes(cfg: ModelConfig, micro: int, tp: int, checkpointing: bool, width: int = 2) -> int:
    s, b, h = cfg.seq_len, micro, cfg.d_model
    layer = s * b * h * (10 + 24 / tp)
    blocks = cfg.n_layer * 2 * s * b * h + layer if checkpointing else cfg.n_layer * layer
    logits = s * b * cfg.vocab_size * (2 + 4 + 4)
    return int((blocks + logits) * width / 2)


def stage_memory(plan: GrowthPlan, k: int, gpu_mem: int = 80 * GIB) -> StageMemory:
    from flm.train import batch_split

    stage, cfg = plan.stages[k], plan.model_configs()[k]
    tp, dp = stage.layout.tp, stage.layout.data_parallel
    micro, _, _ = batch_split(plan, k, dp)
    ac = plan.train.activation_checkpointing == "full"
    bf16 = stage.layout.use_gpu and plan.train.precision != "fp32"
    width = 2 if bf16 else 4
    split, replicated = tp_split_params(cfg)
    shard = (split / tp + replicated) / dp
    params = int(shard * 4)
    block = split / cfg.n_layer / tp + 2 * cfg.d_model * (1 + 2 * int(cfg.bias))
    root = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2) + 2 * cfg.d_model
    gathered = int((root + 2 * block) * width + (block + root) * 4)
    without, with_ac = (activation_bytes(cfg, micro, tp, c, width) for c in (False, True))
    activations = with_ac if ac else without
    total = 4 * params + gathered + activations  # params, grads (= params), AdamW (2 x params)
    return StageMemory(name=stage.name or f"stage{k}", tp=tp, dp=dp, micro_batch=micro, seq_len=cfg.seq_len,
                       activation_checkpointing=ac, params=params, grads=params, optimizer=2 * params,
                       gathered=gathered, activations=activations, activations_without_ac=without,
                       activations_with_ac=with_ac, total=total, gpu_mem=gpu_mem, fits=total <= gpu_mem)


def plan_memory(plan: GrowthPlan, gpu_mem: int = 80 * GIB, dry_run: bool = False) -> list[StageMemory]:
    """Every stage's memory per GPU; with `dry_run`, the sharded states measured from the real parallelization."""
    out = []
    for k in range(len(plan.stages)):
        m = stage_memory(plan, k, gpu_mem)
        if dry_run:
            measured = 4 * measure_param_bytes(plan.model_configs()[k], plan.stages[k].layout.workers,
                                               plan.stages[k].layout.tp,
                                               plan.train.activation_checkpointing == "full")
            m.measured_states = measured
            m.states_error = abs(4 * m.params - measured) / measured
        out.append(m)
    return out


def measure_param_bytes(cfg: ModelConfig, world: int, tp: int, checkpointing: bool = False) -> int:
    """fp32 parameter bytes rank 0 holds once `parallelize` has sharded a meta-device GPT of `cfg` over `world`
    ranks of a fake process group (torch's `fake` backend: collectives are no-ops, shapes are real)."""
    import torch.distributed as td
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from flm.model import GPT
    from flm.parallelize import device_mesh, local_bytes, parallelize

    if isinstance(world, tuple):
        world = world[0]
    if td.is_initialized():
        raise RuntimeError("the dry run needs a process of its own (a process group is already initialised)")
    td.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        with torch.device("meta"):
            model = GPT(cfg)
        parallelize(model, device_mesh(world, tp, "cpu"), activation_checkpointing=checkpointing)
        return local_bytes(p.float() if p.dtype != torch.float32 else p for p in model.parameters())
    finally:
        td.destroy_process_group()


class ServeMemory(BaseModel):
    """Bytes per GPU of serving a model at tensor parallelism `tp` (service/tp.py's split: q, k, v, FFN-in by rows,
    the output projections by columns, everything else replicated), and the KV-cache tokens that fit beside it."""

    tp: int
    weight_bytes: int  # per rank, in the serving dtype
    kv_bytes_per_token: int  # per rank: keys and values of every layer for this rank's heads
    reserve_bytes: int  # kept free for activations and the allocator
    kv_tokens: int  # how many tokens of KV cache fit in what is left (the deployment's max_batch_tokens)
    gpu_mem: int
    fits: bool


def serve_memory(cfg: ModelConfig, tp: int, gpu_mem: int = 80 * GIB, dtype_bytes: int = 2,
                 reserve_fraction: float = 0.1) -> ServeMemory:
    """Weights per rank and KV tokens that fit on a `gpu_mem` GPU; `reserve_fraction` of it is kept for activations
    and fragmentation."""
    split, replicated = tp_split_params(cfg)
    weights = int((split / tp + replicated) * dtype_bytes)
    per_token = 2 * cfg.n_layer * cfg.attn_dim // tp * dtype_bytes
    reserve = int(gpu_mem * reserve_fraction)
    free = gpu_mem - weights - reserve
    return ServeMemory(tp=tp, weight_bytes=weights, kv_bytes_per_token=per_token, reserve_bytes=reserve,
                       kv_tokens=max(0, free // per_token), gpu_mem=gpu_mem, fits=free > 0)
