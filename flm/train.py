"""The training loop every backend runs: one process here, DDP or DeepSpeed workers under Ray Train in cluster/.

A plan trains stage by stage. Within a stage: AdamW with μP per-parameter LR groups, gradient accumulation, the
mask ramp after a growth, eval loss every `eval_every` steps, metrics as JSON lines. Between stages the model grows:
offline (save the stage-end checkpoint, reload it, grow: FLM-101B's way) or online (grow the live model: MSG's).

Learning rate (our reading of "one cosine schedule across stages, each stage starting at its own LR"): stage k
warms up linearly to its `lr` over its warmup, then follows a cosine from `lr` down to the plan's `min_lr` at the
end of the *whole plan*; the next stage restarts at its own `lr` on a cosine over the remaining steps.

Everything a run needs to continue lives in its checkpoints (model with masks, optimizer, ramp, data position,
RNG, counters, metric-stream length), so a killed run resumes bit-identically: same losses to the last digit.
The loop knows nothing of Ray: a `Dist` object carries rank, world size, device and the few collective hooks, and
a `TrainerHooks` object what a caller adds around the loop (cluster/train.py's attempt log and token counts).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed
from torch import nn

from flm import mup
from flm.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir,
)
from flm.config import FLMConfigError, GrowthPlan, ModelConfig, flm_home
from flm.data import Manifest, TokenDataset, TokenizerSpec, prepare_dataset
from flm.flops import flops_per_token, mfu, param_count
from flm.growth import MaskRamp, check_preservation, grow_model, transfer_adamw_state
from flm.loggers import Trackers
from flm.model import GPT
from flm.precision import autocast_dtype
from flm.storage import RunStorage, is_uri, join, staging_dir

GrowFn = Callable[..., GPT]
METRICS_PUSH_S = 30.0  # a run on an object store uploads its metric stream at checkpoints and at most this often


@dataclass
class Dist:
    """What the loop needs from a distributed backend; the defaults are a single process."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    sharded = False  # True: the model is built, loaded and saved in shards (flm/fsdp.py), never whole

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data_rank(self) -> int:
        """Which slice of each global batch this rank reads; ranks of one tensor-parallel group read the same."""
        return self.rank

    @property
    def data_world(self) -> int:
        """How many slices a global batch is cut into (the data-parallel size)."""
        return self.world_size

    def build_model(self, cfg: ModelConfig, seed: int, ck: Checkpoint | None = None) -> GPT:
        """A stage's model on this rank: μP-initialised from `seed`, or holding checkpoint `ck`'s weights and masks."""
        if ck is None:
            return GPT(cfg, generator=torch.Generator().manual_seed(seed)).to(self.device)
        return GPT.from_state(ck.config, ck.model).to(self.device)

    def load_optimizer(self, model: GPT, optimizer: torch.optim.Optimizer, ck: Checkpoint) -> None:
        """Checkpoint `ck`'s AdamW state into `optimizer` (built for `model`), if it has one."""
        if ck.optimizer is not None:  # a grown checkpoint's holds state only: the groups stay this optimizer's
            optimizer.load_state_dict({"param_groups": optimizer.state_dict()["param_groups"], **ck.optimizer})

    def save(self, path: Path, model: GPT, optimizer: torch.optim.Optimizer, trainer_state: dict, rng: dict,
             tokenizer_dir: Path) -> None:
        """Write a checkpoint; called on every rank. Here: whole state dicts, saved by rank 0 alone."""
        model_state, optimizer_state = self.state_dicts(model, optimizer)
        if self.is_main:
            save_checkpoint(path, model.cfg, model_state, optimizer_state, trainer_state, rng, tokenizer_dir)

    def wrap(self, model: GPT) -> nn.Module:
        """The module to run forward/backward through (DDP wraps it); called again after every growth."""
        return model

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank of the default process group (in place; a single process: t itself)."""
        if self.world_size > 1:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def report(self, record: dict, checkpoint: Path | str | None) -> None:
        """Called on every rank at each checkpoint (Ray Train reports here); `checkpoint` is where it lives: the
        run directory's copy, or its URI when train.out is one."""

    # --- hooks for backends that own the gradient reduction or the optimizer (cluster/: DeepSpeed ZeRO) --------
    def prepare(self, model: GPT, module: nn.Module, optimizer: torch.optim.Optimizer) -> nn.Module:
        """Called before a stage's first step, once `optimizer` holds its final state (loaded or transferred by a
        growth); returns the module to train through. ZeRO builds its engine here and takes the state over."""
        return module

    def forward_context(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Wraps a micro batch's forward: DDP skips the gradient all-reduce except after the `last` one."""
        return contextlib.nullcontext() if last or not hasattr(module, "no_sync") else module.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro batch's loss, already divided by the number of micro batches."""
        loss.backward()

    def step(self, optimizer: torch.optim.Optimizer, model: GPT, grad_clip: float) -> None:
        """After the last micro batch: clip the global gradient norm, update, zero the gradients."""
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state_dicts(self, model: GPT, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        """Full model and optimizer state dicts to checkpoint; called on every rank (ZeRO gathers its shards here),
        only rank 0's are saved."""
        return model.state_dict(), optimizer.state_dict()


class TrainerHooks:
    """What a caller adds around the loop without changing it (cluster/train.py: the attempts log and the per-step
    token count of a Ray Train run). Each method is called at one point of `Trainer.fit`, on the ranks named; the
    defaults do nothing. A hook reads the trainer's public state (stage, step, run_dir, storage, dist, plan)."""

    def on_start(self, trainer: Trainer) -> None:
        """On every rank, once `fit` has restored the run directory's newest checkpoint (or started fresh):
        trainer.stage and trainer.step say where this launch starts."""

    def on_step(self, trainer: Trainer, tokens: int) -> None:
        """On every rank after each optimizer step, with the tokens this rank fed into it (its micro batches'
        inputs). Every rank calls it at the same step, so it may run collectives (trainer.dist.all_reduce_sum)."""

    def on_record(self, record: dict) -> dict:
        """On rank 0, with each metric record before it is written to metrics.jsonl and the trackers; returns the
        record to write (extended, say)."""
        return record


def lr_at(plan: GrowthPlan, step: int) -> float:
    """Base learning rate (before μP scaling) at global optimizer step `step`."""
    starts = plan.stage_starts()
    total = starts[-1]
    k = max(i for i in range(len(plan.stages)) if starts[i] <= step) if step < total else len(plan.stages) - 1
    stage, local = plan.stages[k], step - starts[k]
    warmup = stage.warmup_samples // stage.batch_size
    if local < warmup:
        return stage.lr * (local + 1) / warmup
    progress = (step - starts[k] - warmup) / max(1, total - 1 - starts[k] - warmup)  # min_lr at the last step
    return plan.min_lr + (stage.lr - plan.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_split(plan: GrowthPlan, k: int, world: int) -> tuple[int, int, int]:
    """(micro batch per rank, accumulation steps, remainder) of stage k's global batch on `world` ranks: the micro
    batch is train.micro_batch_size, or the batch split evenly. The batch splits only when micro and accumulation
    are >= 1 and the remainder is 0."""
    batch = plan.stages[k].batch_size
    micro = plan.train.micro_batch_size or batch // world
    if micro == 0:
        return 0, 0, batch
    accum, rest = divmod(batch, micro * world)
    return micro, accum, rest


def resolve_run_dir(plan: GrowthPlan) -> Path:
    """The local run directory: train.out, its staging directory when train.out is a URI (flm/storage.py), or
    $FLM_HOME/runs/<plan name>."""
    out = plan.train.out
    if is_uri(out):
        return staging_dir(out, flm_home())
    return Path(out) if out else flm_home() / "runs" / plan.name


def resolve_dataset(plan: GrowthPlan) -> Path:
    """The prepared dataset directory: `train.data` itself, or the source prepared once under $FLM_HOME/data."""
    settings, vocab = plan.train, plan.model_configs()[0].vocab_size
    path = Path(settings.data)
    if (path / "manifest.json").is_file():
        return path
    spec = TokenizerSpec(kind=settings.tokenizer, vocab_size=vocab if settings.tokenizer == "bpe" else None)
    slug = "".join(c if c.isalnum() else "-" for c in settings.data).strip("-")
    out = flm_home() / "data" / f"{slug}-{settings.tokenizer}{spec.vocab_size or ''}"
    if not (out / "manifest.json").is_file():
        prepare_dataset(settings.data, out, spec, seed=plan.seed, seq_len=max(c.seq_len for c in plan.model_configs()))
    return out


class Trainer:
    """Runs a growth plan (or some of its stages) to the end, resuming from the run directory's checkpoints."""

    def __init__(self, plan: GrowthPlan, dist: Dist | None = None, on_record: Callable[[dict], None] | None = None,
                 grow_fn: GrowFn = grow_model, hooks: TrainerHooks | None = None):
        """`grow_fn(model, new_config, operator_order, depth_placement, generator) -> GPT` is MSG by default;
        benchmarks swap in baselines (e.g. depth stacking by copying layers) without touching the loop.
        `on_record(record)` sees every metric record once written (rank 0); `hooks` extend the loop (TrainerHooks)."""
        self.plan, self.settings = plan, plan.train
        self.grow_fn = grow_fn
        self.hooks = hooks or TrainerHooks()
        self.dist = dist or Dist(device=_default_device(plan.train.device))
        self.configs = plan.model_configs()
        self.starts = plan.stage_starts()
        self.run_dir = resolve_run_dir(plan)
        self.on_record = Trackers(plan, self.run_dir, then=on_record)  # train.loggers, then the caller's hook
        self.storage = RunStorage(plan.train.out, self.run_dir) if is_uri(plan.train.out) else None
        self._pushed = time.monotonic()
        self.data_dir = resolve_dataset(plan) if self.dist.is_main else None
        if self.storage and self.dist.is_main:
            self.storage.pull()
        self.dist.barrier()
        if self.storage and not self.dist.is_main:  # a node of its own: its staging directory may lag
            self.storage.pull()
        self.data_dir = self.data_dir or resolve_dataset(plan)
        manifest = Manifest.load(self.data_dir)
        if manifest.vocab_size > self.configs[0].vocab_size:
            raise FLMConfigError(f"stages.0.model.vocab_size: {self.configs[0].vocab_size} is smaller than the "
                                 f"tokenizer's {manifest.vocab_size} tokens ({self.data_dir})")
        self.train_data = TokenDataset(self.data_dir, "train", seed=plan.seed)
        self.val_data = TokenDataset(self.data_dir, "val", seed=plan.seed)
        self.autocast = autocast_dtype(self.dist.device.type, self.settings.precision)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._check_plan_file()

    # --- public -----------------------------------------------------------------------------------------------
    def fit(self, stages: list[int] | None = None, max_steps: int | None = None) -> list[dict]:
        """Train the given stages (default: all). `max_steps` stops early at that global step (simulating an
        interruption). Returns one summary per stage trained."""
        wanted = list(range(len(self.plan.stages))) if stages is None else stages
        self._restore(first_stage=wanted[0])
        self.hooks.on_start(self)
        summaries = []
        while self.stage in wanted:
            summary = self._train_stage(max_steps)
            if summary is None:  # stopped early
                break
            summaries.append(summary)
            nxt = self.stage + 1
            if nxt >= len(self.plan.stages) or nxt not in wanted:
                break
            self._grow_into(nxt, reload=self.plan.stages[nxt].growth == "offline")
        self._push_metrics()
        self.on_record.close()
        return summaries

    # --- state --------------------------------------------------------------------------------------------------
    def _restore(self, first_stage: int) -> None:
        ck = latest_checkpoint(self.run_dir, self.dist.device, tensors=not self.dist.sharded)
        if ck is None:
            if first_stage != 0:
                raise FLMConfigError(f"stage {first_stage}: no checkpoint of the previous stage in {self.run_dir}")
            self._fresh()
            return
        ts = ck.trainer_state
        self.stage, self.step, self.position = ts["stage"], ts["step"], ts["position"]
        self.tokens, self.flops = ts["tokens"], ts["flops"]
        self._load(ck)
        self.ramp = MaskRamp.from_state(ts["ramp"]) if ts.get("ramp") else None
        if ck.rng is not None:
            torch.set_rng_state(ck.rng["torch"])
        self._truncate_metrics(ts["metrics_lines"])
        if first_stage > self.stage:
            if not ts.get("stage_end") or first_stage != self.stage + 1:
                raise FLMConfigError(f"stage {first_stage}: stage {self.stage} has not finished in {self.run_dir}")
            self._grow_into(first_stage, reload=False, mode="offline")  # the checkpoint was just read from disk

    def _fresh(self) -> None:
        self.stage, self.step, self.position, self.tokens, self.flops = 0, 0, 0, 0, 0.0
        self.ramp = None
        self._set_model(self.dist.build_model(self.configs[0], self.plan.seed))
        self._truncate_metrics(0)

    def _load(self, ck: Checkpoint) -> None:
        self._set_model(self.dist.build_model(ck.config, self.plan.seed, ck))
        self.dist.load_optimizer(self.raw, self.optimizer, ck)

    def _set_model(self, model: GPT) -> None:
        self.raw = model
        self.model = self.dist.wrap(self.raw)
        self.optimizer = self._make_optimizer(self.raw)

    def _make_optimizer(self, model: GPT) -> torch.optim.AdamW:
        o = self.settings.optim
        groups = mup.param_groups(model, model.cfg, self.plan.stages[self.stage].lr, o.weight_decay)
        return torch.optim.AdamW(groups, betas=(o.beta1, o.beta2), fused=False)

    def _grow_into(self, k: int, reload: bool, mode: str | None = None) -> None:
        """Grow the stage k-1 model into stage k's shape; optimizer state follows, the mask ramp starts now."""
        stage = self.plan.stages[k]
        if self.dist.sharded:
            self._grow_sharded(k, mode or "offline")
            return
        if reload:  # offline growth: the next stage starts from what is on disk, as a new Train run would
            self._load(load_checkpoint(step_dir(self.run_dir, self.step), self.dist.device))
        old, old_opt = self.raw, self.optimizer
        gen = torch.Generator(device=self.dist.device).manual_seed(self.plan.seed * 1009 + k)
        new = self.grow_fn(old, self.configs[k], stage.operator_order, stage.depth_placement, gen)
        x, y = self.val_data.batch_at(0, min(8, self.val_data.num_windows(old.cfg.seq_len)), old.cfg.seq_len)
        x, y = x.to(self.dist.device), y.to(self.dist.device)
        masked = check_preservation(old, new, x, y)
        self.stage = k
        self.raw, self.model = new, self.dist.wrap(new)
        self.optimizer = self._make_optimizer(new)
        transfer_adamw_state(old_opt, old, self.optimizer, new, stage.depth_placement)
        self.ramp = MaskRamp(self.step, stage.ramp_steps) if stage.ramp_steps else None
        live = masked
        if self.ramp is None:
            new.clear_masks()
            live = check_preservation(old, new, x, y)
        mode = mode or ("offline" if reload else "online")
        self._record(growth_record(self.step, k, mode, new.num_params(), stage.ramp_steps,
                                   (live.max_abs, live.dloss), (masked.max_abs, masked.dloss)))

    def _grow_sharded(self, k: int, mode: str) -> None:
        """Offline growth of a sharded model, never held whole: every rank grows its share of the stage-end
        checkpoint's tensors (flm/offline_growth.py: each tensor's own generator, so the result equals `_grow_into`'s
        growth of the same checkpoint bit for bit) into grown/stage<k>, then loads its shards of the grown model."""
        from flm.offline_growth import finish_growth, grow_share, prepare_growth

        stage, src = self.plan.stages[k], step_dir(self.run_dir, self.step)
        dst = self.run_dir / "grown" / f"stage{k}"
        cfg = self.raw.cfg
        x, y = (t.to(self.dist.device) for t in
                self.val_data.batch_at(0, min(8, self.val_data.num_windows(cfg.seq_len)), cfg.seq_len))
        before, loss_before = self._eval_logits(x, y)
        args = (self.configs[k], stage.operator_order, stage.depth_placement)
        tmp = prepare_growth(dst) if self.dist.is_main else dst.parent / f".tmp-{dst.name}"
        self.dist.barrier()
        grow_share(src, tmp, *args, seed=self.plan.seed * 1009 + k, rank=self.dist.rank,
                   world=self.dist.world_size)
        self.dist.barrier()
        if self.dist.is_main:
            finish_growth(src, tmp, dst, *args)
        self.dist.barrier()
        self.stage = k
        self._load(load_checkpoint(dst, self.dist.device, tensors=False))
        after, loss_after = self._eval_logits(x, y)
        masked = (before - after).abs().max().item(), abs(loss_before - loss_after)
        self.ramp = MaskRamp(self.step, stage.ramp_steps) if stage.ramp_steps else None
        live = masked
        if self.ramp is None:
            self.raw.clear_masks()
            after, loss_after = self._eval_logits(x, y)
            live = (before - after).abs().max().item(), abs(loss_before - loss_after)
        self._record(growth_record(self.step, k, mode, param_count(self.configs[k]), stage.ramp_steps, live, masked))

    @torch.no_grad()
    def _eval_logits(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        was = self.raw.training
        self.raw.eval()
        logits, loss = self.raw(x, y)
        self.raw.train(was)
        return logits, loss.item()

    # --- the loop -----------------------------------------------------------------------------------------------
    def _train_stage(self, max_steps: int | None) -> dict | None:
        k, s = self.stage, self.settings
        stage, cfg = self.plan.stages[k], self.configs[k]
        end = self.starts[k + 1]
        micro, accum, rest = batch_split(self.plan, k, self.dist.data_world)
        if accum == 0 or rest:
            raise FLMConfigError(f"stages.{k}.batch_size: {stage.batch_size} is not a multiple of micro batch "
                                 f"{micro} x {self.dist.data_world} data-parallel ranks")
        per_token = flops_per_token(cfg)
        self.model = self.dist.prepare(self.raw, self.model, self.optimizer)
        t_start, t_log, tokens_log = time.perf_counter(), time.perf_counter(), self.tokens
        self.model.train()
        loss = val_loss = float("nan")
        while self.step < end:
            if max_steps is not None and self.step >= max_steps:
                return None
            if self.ramp is not None and not self.ramp.apply(self.raw, self.step):
                self.ramp = None
            lr = lr_at(self.plan, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            loss, fed = self._step(cfg, micro, accum)
            self.hooks.on_step(self, fed)
            self.step += 1
            self.position += stage.batch_size
            self.tokens += stage.batch_size * cfg.seq_len
            self.flops += per_token * stage.batch_size * cfg.seq_len
            last = self.step == end
            do_eval = self.step % s.eval_every == 0 or last
            if self.step % s.log_every == 0 or do_eval:
                tps = (self.tokens - tokens_log) / max(time.perf_counter() - t_log, 1e-9)
                peak = s.peak_tflops and s.peak_tflops * 1e12 * self.dist.world_size  # FLOP/s of all ranks
                record = {"step": self.step, "stage": k, "tokens": self.tokens, "flops": self.flops,
                          "loss": loss, "lr": lr, "tokens_per_s": tps,
                          "mfu": None if peak is None else mfu(cfg, tps, peak)}
                if do_eval:
                    record["val_loss"] = val_loss = self.evaluate()
                self._record(record)
            if self.step % s.checkpoint_every == 0 or last:
                self._checkpoint(stage_end=last)
            if tokens_log != self.tokens and (self.step % s.log_every == 0 or do_eval):
                t_log, tokens_log = time.perf_counter(), self.tokens  # tokens/s counts training time only
        return {"stage": k, "name": stage.name or f"stage{k}", "params": param_count(cfg), "steps": self.step,
                "tokens": self.tokens, "flops": self.flops, "loss": loss, "val_loss": val_loss,
                "seconds": time.perf_counter() - t_start}

    def _step(self, cfg: ModelConfig, micro: int, accum: int) -> tuple[float, int]:
        """One optimizer step: (the mean loss over every rank's micro batches, the tokens this rank fed)."""
        total, fed = torch.zeros((), device=self.dist.device), 0
        for i in range(accum):
            start = self.position + (self.dist.data_rank * accum + i) * micro
            x, y = (t.to(self.dist.device) for t in self.train_data.batch_at(start, micro, cfg.seq_len))
            fed += x.numel()
            with self.dist.forward_context(self.model, last=i == accum - 1), self._autocast():
                _, loss = self.model(x, y)
            self.dist.backward(loss / accum)
            total += loss.detach()
        self.dist.step(self.optimizer, self.raw, self.settings.optim.grad_clip)
        return (self.dist.all_reduce_sum(total) / (accum * self.dist.world_size)).item(), fed

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, split across ranks."""
        cfg, s = self.raw.cfg, self.settings
        bs = min(8, self.val_data.num_windows(cfg.seq_len))
        n = min(s.eval_batches, self.val_data.num_windows(cfg.seq_len) // bs)
        if n == 0:
            raise FLMConfigError(f"{self.data_dir}: the validation split has fewer than one window of {cfg.seq_len}")
        was = self.model.training
        self.model.eval()
        sums = torch.zeros(2, device=self.dist.device, dtype=torch.float64)
        parts = self.dist.data_world
        # every rank runs as many forwards as the others (sharded models gather in every forward): the last
        # round's extra batches repeat the last one and count zero
        for i in range(self.dist.data_rank, -(-n // parts) * parts, parts):
            x, y = (t.to(self.dist.device) for t in self.val_data.batch_at(min(i, n - 1) * bs, bs, cfg.seq_len))
            with self._autocast():
                _, loss = self.raw(x, y)
            weight = float(i < n)
            sums += torch.tensor([loss.item() * weight, weight], device=self.dist.device, dtype=torch.float64)
        self.model.train(was)
        sums = self.dist.all_reduce_sum(sums)
        return (sums[0] / sums[1]).item()

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast)

    # --- files ----------------------------------------------------------------------------------------------------
    def _checkpoint(self, stage_end: bool) -> None:
        path = step_dir(self.run_dir, self.step)
        state = {"step": self.step, "stage": self.stage, "stage_end": stage_end, "position": self.position,
                 "tokens": self.tokens, "flops": self.flops, "plan": self.plan.name,
                 "ramp": self.ramp.state_dict() if self.ramp else None, "metrics_lines": self._metrics_lines}
        self.dist.save(path, self.raw, self.optimizer, state, {"torch": torch.get_rng_state()},
                       self.data_dir / "tokenizer")
        if self.dist.is_main:
            prune_checkpoints(self.run_dir, self.settings.keep_checkpoints)
            if self.storage:  # the metrics first: the newest checkpoint at the URI never has more lines than they
                self._push_metrics()
                self.storage.push_checkpoint(path)
                self.storage.prune()
        self.dist.barrier()
        where = join(self.storage.uri, f"checkpoints/{path.name}") if self.storage else path
        self.dist.report({"step": self.step, "stage": self.stage}, where)

    def _record(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        record = self.hooks.on_record(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._metrics_lines += 1
        if self.storage and time.monotonic() - self._pushed > METRICS_PUSH_S:
            self._push_metrics()
        if self.on_record is not None:
            self.on_record(record)

    def _push_metrics(self) -> None:
        if self.storage and self.dist.is_main:
            self.storage.push_file("metrics.jsonl")
            self._pushed = time.monotonic()

    def _truncate_metrics(self, lines: int) -> None:
        """Drop metric records written after the checkpoint we resume from, so the stream has no duplicates."""
        self._metrics_lines = lines
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = self.metrics_path.read_text().splitlines(keepends=True)[:lines] if self.metrics_path.exists() else []
        self.metrics_path.write_text("".join(kept))

    def _check_plan_file(self) -> None:
        """A run directory belongs to one plan: refuse to resume it with different stages."""
        if not self.dist.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "plan.json"
        stages = self.plan.model_dump(mode="json", exclude={"train"})
        if path.exists():
            if json.loads(path.read_text()) != stages:
                raise FLMConfigError(f"{self.run_dir}: holds a run of a different plan; choose another train.out")
        else:
            path.write_text(json.dumps(stages, indent=2))
            if self.storage:
                self.storage.push_file("plan.json")


def growth_record(step: int, stage: int, mode: str, params: int, ramp_steps: int, live: tuple[float, float],
                  masked: tuple[float, float]) -> dict:
    """The metric record of a growth event. `live` and `masked` are (max |Δlogits|, |Δloss|) on a validation batch
    between the old model and the grown one: `live` as the grown model trains from this step, `masked` with every
    growth mask at 0 (the operators' exactness, flm/growth.py).

    They differ when `ramp_steps` is 0: the masks are then removed at once and the new weights train at full scale
    from the first step (`mask` 1.0), so the function is not preserved and `dloss` says by how much. With a ramp
    the first step trains at mask 0 and the two are the same. `dloss` / `max_abs_dlogits` always describe the model
    that trains."""
    return {"event": "growth", "step": step, "stage": stage, "mode": mode, "params": params,
            "ramp_steps": ramp_steps, "mask": 0.0 if ramp_steps else 1.0,
            "max_abs_dlogits": live[0], "dloss": live[1],
            "masked_max_abs_dlogits": masked[0], "masked_dloss": masked[1]}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _default_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)
