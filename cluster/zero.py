"""`ZeroDist`: DeepSpeed ZeRO (stage 1, 2 or 3) as the gradient and optimizer backend of a Ray Train worker.

DeepSpeed owns the optimizer for the length of one stage: `prepare` hands it our AdamW (μP parameter groups, state
already loaded from a checkpoint or carried through a growth), DeepSpeed flattens and partitions it across ranks,
and `state_dicts` gathers it back at every checkpoint into the plain `torch.optim.AdamW` state dict of a single
process. Checkpoints therefore stay in our format and load at any world size and under any backend.

Runs on CPU with gloo (the process group Ray Train set up) as well as on GPUs with nccl. The trainer's loop is
unchanged: `backward` and `step` map to the engine's, with DeepSpeed counting the gradient accumulation micro
steps; gradient clipping is DeepSpeed's (`gradient_clipping`, the same global-norm rule as torch's).

DeepSpeed 0.19 links its optimizer-state views (`safe_get_full_optimizer_state`) after the first parameter group's
first step, before the other groups have state, so those views stay empty. We therefore create every AdamW state
up front (zeros and step 0 are what AdamW would create lazily) and read and write the partitions directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as td
from torch import nn

from cluster.dist import RayDist
from flm.model import GPT

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def skip_inference_comm_kernel() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory all-reduce kernel (`deepspeed_shm_comm`, C++ with g++)
    when its communication backend starts on CPU: measured ~55 s on a fresh machine, paid by every new node of an
    autoscaled cluster, and only `inference_all_reduce` uses it, which training never calls (DeepSpeed 0.19's
    `deepspeed/comm/torch.py`). DeepSpeed skips an op its compatibility table marks incompatible."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


@dataclass
class ZeroDist(RayDist):
    """A Ray Train worker training through a DeepSpeed engine. One stage per process: Ray Train runs one."""

    zero_stage: int = 2
    micro_batch: int = 1
    accum: int = 1
    grad_clip: float = 1.0
    engine: object | None = field(default=None, repr=False)

    def wrap(self, model: GPT) -> nn.Module:
        return model  # the engine is built in `prepare`, once the optimizer exists

    def deepspeed_config(self) -> dict:
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accum,
            "train_batch_size": self.micro_batch * self.accum * self.world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
        }

    def prepare(self, model: GPT, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        import deepspeed

        if self.engine is not None:
            raise RuntimeError("ZeroDist trains one stage per process (cluster.train.run_plan runs one per stage)")
        self._groups = [list(g["params"]) for g in optimizer.param_groups]
        saved = [[optimizer.state.get(p, {}) for p in params] for params in self._groups]
        optimizer.state.clear()  # DeepSpeed keeps the state of its flat partitions; ours is loaded below
        skip_inference_comm_kernel()
        self.engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=self.deepspeed_config(), dist_init_required=False)
        self._zero, self._base = zero, zero.optimizer
        self._create_state(saved)
        for params, states in zip(self._groups, saved, strict=True):
            for p, state in zip(params, states, strict=True):
                for key in ADAM_KEYS:
                    if key in state:
                        self._set_full(p, state[key], key)
        return self.engine

    def forward_context(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed reduces at the accumulation boundary it counts itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the trainer already divided by the micro batches
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only counts the micro step

    def step(self, optimizer: torch.optim.Optimizer, model: GPT, grad_clip: float) -> None:
        self.engine.step()

    def state_dicts(self, model: GPT, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """The full model and a single-process AdamW state dict, assembled on rank 0 one tensor at a time (every
        rank must call it; the others get empty dicts and hold no more than one gathered tensor)."""
        main = self.is_main
        model_state = model.state_dict() if main else {}
        if self.zero_stage == 3:  # parameters are partitioned too: gather the fp32 masters
            for name, p in model.named_parameters():
                full = self._full(p)
                if main:
                    model_state[name] = full.to(p.dtype)
        state, groups, index = {}, [], 0
        for g, params in zip(optimizer.param_groups, self._groups, strict=True):
            ids = []
            for p in params:
                moments = {key: self._full(p, key) for key in ADAM_KEYS}
                if main:
                    state[index] = {"step": self._step_of(p).clone(), **moments}
                ids.append(index)
                index += 1
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
        return model_state, ({"state": state, "param_groups": groups} if main else {})

    # --- DeepSpeed's partitions ------------------------------------------------------------------------------
    def _flats(self) -> list[torch.Tensor]:
        """The fp32 partitions the base optimizer steps: one per group (ZeRO-1/2) or per sub-group (ZeRO-3)."""
        z = self._zero
        return list(z.fp32_partitioned_groups_flat if self.zero_stage == 3 else z.single_partition_of_fp32_groups)

    def _create_state(self, saved: list[list[dict]]) -> None:
        flats = self._flats()
        z = self._zero
        groups = [z.sub_group_to_group_id[i] for i in range(len(flats))] if self.zero_stage == 3 else range(len(flats))
        for flat, g in zip(flats, groups, strict=True):
            steps = [float(s["step"]) for s in saved[g] if "step" in s]
            self._base.state[flat] = {"step": torch.tensor(max(steps, default=0.0)),
                                      **{key: torch.zeros_like(flat) for key in ADAM_KEYS}}

    def _step_of(self, p: torch.Tensor) -> torch.Tensor:
        if self.zero_stage == 3:
            flat = self._flats()[self._zero.grad_position[self._zero.get_param_id(p)][0]]
        else:
            flat = self._flats()[next(i for i, ps in enumerate(self._groups) if any(q is p for q in ps))]
        return self._base.state[flat]["step"]

    def _full(self, p: torch.Tensor, key: str | None = None) -> torch.Tensor | None:
        """The whole fp32 parameter (key None) or its AdamW state `key`, assembled from every rank's partition on
        rank 0 (None elsewhere). Collective."""
        if self.zero_stage == 3:
            full = p._z3_optimizer.get_full_hp_param(p, key)  # an all-gather
            return full.view(p.ds_shape) if self.is_main else None
        buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        m = p._hp_mapping  # None when none of p lies in this rank's partition
        if m is not None:
            hp, lp = m.hp_fragment_address, m.lp_fragment_address
            src = m.hp_fragment if key is None else \
                self._base.state[self._flats()[m.param_group_index]][key].narrow(0, hp.start, hp.numel)
            buf.narrow(0, lp.start, lp.numel).copy_(src)
        if self.world_size > 1:
            td.reduce(buf, dst=0)
        return buf.view(p.shape) if self.is_main else None

    def _set_full(self, p: torch.Tensor, value: torch.Tensor, key: str) -> None:
        if self.zero_stage == 3:
            p._z3_optimizer.set_full_hp_param(value.to(p.device), p, key)
            return
        m = p._hp_mapping
        if m is not None:
            hp, lp = m.hp_fragment_address, m.lp_fragment_address
            dest = self._base.state[self._flats()[m.param_group_index]][key].narrow(0, hp.start, hp.numel)
            dest.copy_(value.flatten().narrow(0, lp.start, lp.numel))
