"""Sharded training: FSDP2 over the data-parallel mesh dimension, tensor parallelism over the `tp` dimension.

The model (flm/model.py) knows nothing of this module; everything is applied from outside, in torchtitan's order:

    GPT built on the meta device (no memory)
      -> tensor parallelism   (parallelize_module, per block, TP_PLAN below; masks sliced to the local heads/units)
      -> activation checkpointing (composable `checkpoint(block)`: parameter names unchanged)
      -> FSDP2                (fully_shard per block, then the root: parameters, gradients, AdamW state sharded)
      -> to_empty(device)     (each rank allocates only its own shards)
      -> init_shards / load   (μP init of the local shards, or a sharded checkpoint: flm/sharded.py)

One block on a (dp, tp) mesh, tp = 2 (h heads, f FFN units, d model width; x is (B, T, d) on every tp rank):

                     x (replicated over tp)
                 LayerNorm (replicated)
         q, k, v: rows of heads [0, h/2) | rows of heads [h/2, h)       ColwiseParallel (weight Shard(0))
         attention over its own heads    | attention over its heads
         proj: columns of its heads      | columns of its heads         RowwiseParallel (Shard(1)), all-reduce
         fc: units [0, f/2)              | units [f/2, f)               ColwiseParallel
         proj: columns of its units      | columns of its units         RowwiseParallel, all-reduce
Embedding (tied head), LayerNorms and biases of the row-parallel layers are replicated over tp. FSDP2 then shards
every parameter (TP's shards included: 2-D DTensors) over dp by its first dimension.

Growth masks: `hidden_mask` and `gate` act on the replicated residual stream and stay whole; `head_mask` and
`ffn_mask` act on column-parallel outputs and are sliced to this rank's heads and units (`shard_masks`), so the
model's own `masked_linear` multiplies local outputs by local masks.

Pipeline parallelism is not implemented: a plan with layout.pp > 1 is refused (flm/config.py); FSDP x TP fits
every stage of the 101B plan (see `flm plan --dry-run`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable

import torch
import torch.distributed as td
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from flm import mup
from flm.config import FLMConfigError, ModelConfig
from flm.model import GPT

# Module name inside a block -> how tensor parallelism splits it (torchtitan's declarative plan).
TP_PLAN = {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.proj": "rowwise",
           "mlp.fc": "colwise", "mlp.proj": "rowwise"}
MESH_DIMS = ("dp", "tp")


def check_tp(cfg: ModelConfig, tp: int, where: str = "layout.tp") -> None:
    """Tensor parallelism splits heads and FFN units: both must divide evenly."""
    if tp < 1 or cfg.n_head % tp or cfg.d_ffn % tp:
        fits = [t for t in (1, 2, 4, 8, 16, 32, 64) if not cfg.n_head % t and not cfg.d_ffn % t]
        raise FLMConfigError(f"{where}: {tp} must divide the head count ({cfg.n_head}) and the FFN width "
                             f"({cfg.d_ffn}); choose one of {fits}")


def device_mesh(world_size: int, tp: int, device_type: str = "cpu") -> DeviceMesh:
    """The 2-D (dp, tp) mesh of a stage: tp ranks next to each other (one node's fast links), dp = world / tp."""
    if tp < 1 or world_size % tp:
        raise FLMConfigError(f"layout.tp: {tp} does not divide the {world_size} workers")
    return init_device_mesh(device_type, (world_size // tp, tp), mesh_dim_names=MESH_DIMS)


def apply_tp(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Column/row-parallel q, k, v, attention out, FFN in and out of every block (TP_PLAN), outputs as local
    tensors; the head and FFN masks sliced to this rank's share."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[kind]() for name, kind in TP_PLAN.items()}
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)
    shard_masks(model, tp_mesh.get_local_rank(), tp_mesh.size())


def shard_masks(model: GPT, rank: int, tp: int) -> None:
    """Replace each block's head and FFN mask by the slice of this tensor-parallel rank (no-op without masks)."""
    if tp == 1:
        return
    for block in model.blocks:
        for owner, attr in ((block.attn, "head_mask"), (block.mlp, "ffn_mask")):
            mask = getattr(owner, attr)
            if mask is not None and mask.device.type != "meta":
                setattr(owner, attr, mask.chunk(tp)[rank].clone())


def apply_activation_checkpointing(model: GPT) -> None:
    """Recompute each block's activations in backward: only block inputs stay alive between forward and backward.
    The composable API keeps parameter names (no `_checkpoint_wrapped_module.` prefix)."""
    from torch.distributed._composable import checkpoint

    for block in model.blocks:
        checkpoint(block)


def apply_fsdp(model: GPT, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2 per block, then the root (embedding, final LayerNorm): each block's parameters are all-gathered just
    before it runs and freed after. `param_dtype` (bf16 on GPUs) is the compute copy; master weights, gradient
    reduction and AdamW state stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    n = len(model.blocks)
    for i, block in enumerate(model.blocks):
        # the last block's parameters are needed again right away by backward: keep them gathered
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(model: GPT, mesh: DeviceMesh, *, activation_checkpointing: bool = False,
                param_dtype: torch.dtype | None = None) -> GPT:
    """TP (when the mesh's tp > 1), activation checkpointing, then FSDP2 over dp, in place; returns `model`."""
    check_tp(model.cfg, mesh["tp"].size())
    if mesh["tp"].size() > 1:
        apply_tp(model, mesh["tp"])
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    apply_fsdp(model, mesh["dp"], param_dtype)
    return model


def build_sharded(cfg: ModelConfig, mesh: DeviceMesh, device: torch.device, *, masks: dict | None = None,
                  activation_checkpointing: bool = False, param_dtype: torch.dtype | None = None) -> GPT:
    """A parallelized GPT of `cfg` whose parameters are allocated (uninitialised) on `device`, this rank's shards
    only; `masks` (whole growth masks by state-dict name) are installed and sliced for TP."""
    with torch.device("meta"):
        model = GPT(cfg)
    parallelize(model, mesh, activation_checkpointing=activation_checkpointing, param_dtype=param_dtype)
    model.to_empty(device=device)
    if masks:
        install_masks(model, masks, mesh)
    return model


def install_masks(model: GPT, masks: dict[str, torch.Tensor], mesh: DeviceMesh) -> None:
    """Whole growth masks into a parallelized model (the head and FFN masks sliced to this tp rank)."""
    model.clear_masks()
    device = next(model.parameters()).device
    for name, t in masks.items():
        owner, attr = model._owner(name)
        setattr(owner, attr, t.detach().to(device=device, dtype=torch.float32).clone())
    shard_masks(model, mesh["tp"].get_local_rank(), mesh["tp"].size())


def gather_masks(model: GPT, mesh: DeviceMesh) -> dict[str, torch.Tensor]:
    """The whole growth masks of a parallelized model (the inverse of install_masks); collective over tp."""
    tp = mesh["tp"].size()
    out = {}
    for name, t in model.growth_masks().items():
        if tp > 1 and name.endswith(("head_mask", "ffn_mask")):
            parts = [torch.empty_like(t) for _ in range(tp)]
            td.all_gather(parts, t.contiguous(), group=mesh["tp"].get_group())
            t = torch.cat(parts)
        out[name] = t.detach().cpu().clone()
    return out


@torch.no_grad()
def init_shards(model: GPT, seed: int) -> None:
    """μP initialisation of this rank's shards (flm/mup.py's distributions). Each shard has its own generator,
    seeded by (seed, parameter name, mesh coordinate): the same seed and layout give the same weights, and no
    rank ever draws the whole tensor."""
    for name, p in model.named_parameters():
        local, where = (p.to_local(), tuple(p.device_mesh.get_coordinate() or ())) if isinstance(p, DTensor) \
            else (p, ())
        gen = torch.Generator(device=local.device).manual_seed(zlib.crc32(f"{seed}:{name}:{where}".encode()))
        mup.init_parameter(model.cfg, name, local, gen)


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes this rank holds of `tensors` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, group=None) -> torch.Tensor:
    """Clip the global gradient norm over sharded (DTensor) gradients on any mesh. Each rank sums the squares of its
    local shards, divided by how many ranks hold a copy of them, and one all-reduce over the world adds it up:
    the same norm as torch's clip_grad_norm_ on the whole model (up to summation order)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    world = td.get_world_size(group)
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    for g in grads:
        if isinstance(g, DTensor):  # copies: replicas inside its mesh, times the meshes like it (a dp sub-mesh)
            mesh = g.device_mesh
            replicas = math.prod(mesh.size(i) for i, pl in enumerate(g.placements) if pl.is_replicate())
            copies = replicas * world // mesh.size()
            total += g.to_local().double().pow(2).sum() / copies
        else:  # a plain tensor: the same on every rank
            total += g.double().pow(2).sum() / world
    td.all_reduce(total, group=group)
    norm = total.sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0).item()
    for g in grads:
        g.mul_(coef)
    return norm
