"""`FSDPDist`: the training loop's `Dist` for `backend: fsdp`: FSDP2 x tensor parallelism (flm/parallelize.py),
models built on the meta device and materialised shard by shard, sharded checkpoints (flm/sharded.py).

No rank ever holds the whole model: a fresh stage initialises its own shards; a resumed one reads its pieces of a
sharded checkpoint (any layout: DCP reshards) or of a single-file one (small models, e.g. a stage trained by
`ddp`); growth between stages grows the checkpoint tensor by tensor, shared over the ranks (flm/offline_growth.py).

Needs an initialised default process group (torchrun, Ray Train's TorchTrainer, or the tests' gloo ranks).
Data: the ranks of one tensor-parallel group read the same micro batches; dp = world / tp slices split the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from flm.checkpoint import Checkpoint, read_optimizer
from flm.config import ModelConfig
from flm.model import GPT
from flm.parallelize import build_sharded, clip_grad_norm_, device_mesh, gather_masks, init_shards, install_masks
from flm.sharded import (
    load_full,
    load_safetensors,
    load_safetensors_moments,
    load_sharded,
    read_masks,
    read_safetensors_masks,
    save_sharded,
)
from flm.train import Dist


@dataclass
class FSDPDist(Dist):
    """One rank of a (dp, tp) mesh over the default process group."""

    tp: int = 1
    activation_checkpointing: bool = False
    param_dtype: torch.dtype | None = None  # FSDP2's compute copy (bf16 on GPUs); None: the fp32 masters
    mesh: object | None = field(default=None, repr=False)

    sharded = True

    def __post_init__(self):
        if self.mesh is None:
            self.mesh = device_mesh(self.world_size, self.tp, self.device.type)

    @property
    def data_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def data_world(self) -> int:
        return self.mesh["dp"].size()

    # --- the model ----------------------------------------------------------------------------------------------
    def build_model(self, cfg: ModelConfig, seed: int, ck: Checkpoint | None = None) -> GPT:
        model = build_sharded(cfg, self.mesh, self.device, activation_checkpointing=self.activation_checkpointing,
                              param_dtype=self.param_dtype)
        if ck is None:
            init_shards(model, seed)
            return model
        if ck.sharded:
            load_sharded(ck.path, model)
            masks = read_masks(ck.path)
        else:  # safetensors, one file or a grown checkpoint's several: each rank reads its pieces
            load_safetensors(ck.path, model)
            masks = read_safetensors_masks(ck.path)
        if masks:
            install_masks(model, masks, self.mesh)
        return model

    def load_optimizer(self, model: GPT, optimizer: torch.optim.Optimizer, ck: Checkpoint) -> None:
        if ck.sharded:
            load_sharded(ck.path, model, optimizer, params=False)
        elif (ck.path / "optimizer").is_dir():  # a grown checkpoint's moments, read in pieces
            load_safetensors_moments(ck.path, model, optimizer)
        elif (ck.path / "optimizer.pt").is_file():  # one torch.save file: read whole (small models)
            load_full(model, model.cfg, optimizer, read_optimizer(ck.path, model.cfg))

    def wrap(self, model: GPT) -> nn.Module:
        return model  # parallelized when built

    def save(self, path, model: GPT, optimizer, trainer_state: dict, rng: dict, tokenizer_dir) -> None:
        save_sharded(path, model.cfg, model, optimizer, gather_masks(model, self.mesh), trainer_state, rng,
                     tokenizer_dir, self.is_main)

    # --- collectives and the step -------------------------------------------------------------------------------
    def forward_context(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # FSDP2 reduce-scatters each micro batch's gradients into the shards

    def step(self, optimizer: torch.optim.Optimizer, model: GPT, grad_clip: float) -> None:
        clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
