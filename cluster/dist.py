"""`RayDist`: the training loop's `Dist` inside a Ray Train worker, with torch DDP as the gradient backend.

Ray Train's TorchTrainer has already set up the torch process group (gloo on CPU, nccl on GPU, gloo for a plan with
train.device: cpu) when the train function starts; rank and world size come from `ray.train.get_context()`, the
device from `ray.train.torch` (or the CPU, for train.device: cpu).
"""

from __future__ import annotations

import inspect
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flm.fsdp import FSDPDist
from flm.model import GPT
from flm.storage import is_uri
from flm.train import Dist

POINTER = "flm_checkpoint.json"
# every rank computes the same growth masks: no buffer sync before each forward (the option's name since torch 2.13)
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


@dataclass
class RayDist(Dist):
    """Rank, world size and device of this Ray Train worker; DDP for the gradients; Ray reports at checkpoints."""

    last_record: dict = field(default_factory=dict)

    @classmethod
    def from_context(cls, device: str = "auto", **kwargs) -> RayDist:
        """`device` is the plan's train.device: "cpu" keeps the worker on the CPU even where Ray gave it a GPU (the
        stage's process group is then gloo: cluster/train.py); otherwise the GPU Ray assigned, if any."""
        ctx = ray.train.get_context()
        dev = torch.device("cpu") if device == "cpu" else ray.train.torch.get_device()
        return cls(rank=ctx.get_world_rank(), world_size=ctx.get_world_size(), device=dev, **kwargs)

    def wrap(self, model: GPT) -> nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **_NO_BUFFER_SYNC)

    def observe(self, record: dict) -> None:
        """`Trainer(on_record=...)` on rank 0: the latest training record goes with the next Ray report."""
        if "loss" in record:
            self.last_record = {k: v for k, v in record.items() if v is not None}

    def report(self, record: dict, checkpoint: Path | str | None) -> None:
        """One `ray.train.report` per checkpoint, on every rank (it is a barrier). Rank 0 attaches a pointer to our
        checkpoint directory rather than the directory itself: the checkpoint already lives in the shared run
        directory in our format, so Ray keeps a few bytes instead of a second copy of the weights."""
        metrics = {**self.last_record, **record}
        if checkpoint is None or not self.is_main:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            location = str(checkpoint) if is_uri(checkpoint) else str(Path(checkpoint).resolve())
            (Path(tmp) / POINTER).write_text(json.dumps({"path": location, **record}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def checkpoint_path(checkpoint: ray.train.Checkpoint | None) -> Path | str | None:
    """Our checkpoint (a directory, or its URI) that a Ray checkpoint reported by `RayDist.report` points to."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        pointer = Path(d) / POINTER
        if not pointer.is_file():
            return None
        location = json.loads(pointer.read_text())["path"]
        return location if is_uri(location) else Path(location)


@dataclass
class RayFSDPDist(FSDPDist, RayDist):
    """A Ray Train worker of a `backend: fsdp` stage: FSDP2 x TP on a (dp, tp) mesh over the process group Ray Train
    set up (flm/fsdp.py), with RayDist's reports at checkpoints."""
