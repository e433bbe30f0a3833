"""Megatron-style tensor parallelism for inference: each of `tp` ranks holds a slice of every block, and two
all-reduces per block make the residual stream whole again on every rank.

One block on tp = 2 ranks (h heads of head_dim hd, FFN width f, model width d; x is (B, T, d)):

                          x  (replicated on every rank)
                          |
                     LayerNorm (replicated)
              +-----------+-----------+
   rank 0     |                       |     rank 1
   q,k,v rows of heads 0 .. h/2-1     q,k,v rows of heads h/2 .. h-1    column-parallel (+ bias slice)
   attention, KV cache of its heads   attention, KV cache of its heads
   y0 @ W_o[:, its columns]^T         y1 @ W_o[:, its columns]^T        row-parallel
              +------ all-reduce -----+                                  one all-reduce (sum)
                          + b_o                                          bias once, after the reduction
                     x = x + ... ; LayerNorm (replicated)
              +-----------+-----------+
   fc rows 0 .. f/2-1, GELU           fc rows f/2 .. f-1, GELU          column-parallel (+ bias slice)
   @ W_2[:, its columns]^T            @ W_2[:, its columns]^T           row-parallel
              +------ all-reduce -----+
                          + b_2
   Embedding, final LayerNorm and the (tied) head are replicated: logits come out whole on every rank.

Each rank reads only its slices from the checkpoint's safetensors (`safe_open` + `get_slice`), so no process ever
holds the whole model's blocks when tp > 1. The model code stays parallelism-free: a rank builds flm's own `GPT`
with n_head / tp heads and d_ffn / tp FFN units (exactly the shapes of its slices), swaps the two output
projections of every block for `RowParallelLinear`, and hands it to service/decoder.py's `ServingGPT` (the same
forward with q, k, v fused into one matmul per rank); the rotary tables, left padding and the KV cache are flm's.

Growth masks (a checkpoint saved mid-ramp) are served exactly, not refused: `head_mask` and `ffn_mask` are sliced
with their heads and FFN rows (they live on the column-parallel side); `hidden_mask` and `gate` are replicated
(LayerNorm statistics run on the whole, replicated residual stream); the hidden mask on the two row-parallel
outputs is folded into their weight rows and bias before the reduction, as flm's `masked_linear` folds it.

Ranks are Ray actors (`ModelShard`) in one placement group (one bundle per rank, STRICT_PACK: one node, so the
all-reduces never cross the network), joined in a torch.distributed group: gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from flm.checkpoint import MANIFEST
from flm.config import FLMConfigError, ModelConfig
from flm.model import GPT
from service.decoder import PACKED_ROWS, ServingGPT, can_pack
from service.slots import SlotBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def serving_dtype(dtype: str, device: str) -> torch.dtype:
    """DTYPES[dtype]; "auto": bfloat16 where flm/precision.py finds it fast (GPUs, CPUs with AVX512-BF16 or AMX),
    float32 elsewhere (an AVX2 CPU runs bf16 matmuls through a fallback tens of times slower)."""
    if dtype != "auto":
        return DTYPES[dtype]
    from flm.precision import autocast_dtype

    return autocast_dtype(torch.device(device).type) or torch.float32


def read_config(checkpoint: str | Path) -> ModelConfig:
    """The config of a servable checkpoint: complete (its manifest written, files of the listed sizes) and with
    safetensors weights. Sizes only: hashing a large checkpoint on every replica start would take minutes."""
    from flm.sharded import is_sharded

    directory = Path(checkpoint)
    if not (directory / "config.json").is_file():
        raise FLMConfigError(f"{directory}: not a checkpoint (no config.json)")
    if not is_sharded(directory) and not list(directory.glob("*.safetensors")):
        raise FLMConfigError(f"{directory}: no *.safetensors weights (nor sharded/ DCP shards)")
    manifest = directory / MANIFEST
    if manifest.is_file():
        for name, meta in json.loads(manifest.read_text()).items():
            p = directory / name
            if not p.is_file() or p.stat().st_size != meta["bytes"]:
                raise FLMConfigError(f"{directory}: {name} is missing or truncated")
    return ModelConfig.model_validate_json((directory / "config.json").read_text())


def shard_config(cfg: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's model: n_head / tp heads and d_ffn / tp FFN units, everything else unchanged (the
    μP width multiplier depends on d_model only, so the logit scale stays right)."""
    if tp < 1 or cfg.n_head % tp or cfg.d_ffn % tp:
        fits = [t for t in range(1, cfg.n_head + 1) if not cfg.n_head % t and not cfg.d_ffn % t]
        raise FLMConfigError(f"--tp: {tp} must divide the head count ({cfg.n_head}) and the FFN width "
                             f"({cfg.d_ffn}); choose one of {fits}")
    return ModelConfig(**{**cfg.model_dump(), "n_head": cfg.n_head // tp, "d_ffn": cfg.d_ffn // tp})


def _read_slice(f, name: str, cfg: ModelConfig, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s part of tensor `name`: column-parallel rows, row-parallel columns, or the whole tensor."""
    heads, ffn = cfg.n_head // tp, cfg.d_ffn // tp
    width = heads * cfg.head_dim
    a = slice(rank * width, (rank + 1) * width)  # this rank's attention channels
    u = slice(rank * ffn, (rank + 1) * ffn)  # this rank's FFN units
    if name.endswith(("attn.q.weight", "attn.q.bias", "attn.k.weight", "attn.k.bias", "attn.v.weight",
                      "attn.v.bias")):
        return f.get_slice(name)[a]
    if name.endswith("attn.proj.weight"):
        return f.get_slice(name)[:, a]
    if name.endswith("attn.head_mask"):
        return f.get_slice(name)[rank * heads:(rank + 1) * heads]
    if name.endswith(("mlp.fc.weight", "mlp.fc.bias", "mlp.ffn_mask")):
        return f.get_slice(name)[u]
    if name.endswith("mlp.proj.weight"):
        return f.get_slice(name)[:, u]
    return f.get_tensor(name)  # replicated: embeddings, LayerNorms, out-proj biases, hidden_mask, gate


class _Whole:
    """safe_open's get_slice / get_tensor over one tensor already read (a sharded checkpoint gives whole tensors)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def get_slice(self, name: str) -> torch.Tensor:
        return self.t

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.t


def read_shard_state(checkpoint: str | Path, cfg: ModelConfig, rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s state dict, read slice by slice from every model *.safetensors file of the checkpoint; from a
    sharded (DCP) checkpoint one whole tensor at a time, sliced and dropped: never the whole model."""
    from flm.sharded import is_sharded

    if is_sharded(checkpoint):
        from flm.offline_growth import CheckpointReader

        reader = CheckpointReader(checkpoint)
        state = {name: _read_slice(_Whole(t), name, cfg, rank, tp).clone() for name, t in reader.masks().items()}
        for name in reader.param_names():
            state[name] = _read_slice(_Whole(reader.tensor(name)), name, cfg, rank, tp).clone()
        return state
    state = {}
    for path in sorted(Path(checkpoint).glob("model*.safetensors")):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if ".attn.qkv." in name:  # an older checkpoint's fused [q | k | v] rows
                    t, (prefix, _, kind) = f.get_slice(name), name.rpartition(".qkv.")
                    heads = cfg.n_head // tp * cfg.head_dim
                    for c, part in enumerate("qkv"):
                        start = c * cfg.attn_dim + rank * heads
                        state[f"{prefix}.{part}.{kind}"] = t[start:start + heads]
                    continue
                state[name] = _read_slice(f, name, cfg, rank, tp)
    return state


class RowParallelLinear(nn.Module):
    """y = all_reduce(x @ W_rank^T) + b: x's last dimension is this rank's slice of the input, y is whole on every
    rank; the bias is added once, after the reduction."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, reduce: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.reduce = reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce:
            return F.linear(x, self.weight, self.bias)
        y = F.linear(x, self.weight)
        dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


def input_major(model: nn.Module) -> None:
    """Store every projection weight (and the tied embedding / head) input-major: W as the transpose of a contiguous
    (in, out) matrix, the same values. F.linear then runs x @ (in, out) without a transpose, which is faster on CPU:
    1.14x for the 16 projections of a tiny-model step, 1 or 16 rows (benchmarks/linear_layout.py; benchmarks/serve.py
    measures the whole engine). The embedding lookup reads strided rows."""
    for m in model.modules():
        if isinstance(m, nn.Linear | RowParallelLinear | nn.Embedding):
            m.weight = nn.Parameter(m.weight.detach().t().contiguous().t(), requires_grad=False)


def build_shard(cfg: ModelConfig, state: dict[str, torch.Tensor], tp: int, positions: int = 0) -> ServingGPT:
    """One rank's model for inference: flm's GPT holding the rank's slices, its two output projections per block made
    row-parallel (the hidden mask of a mid-ramp checkpoint folded into their weight rows and bias, as flm's
    masked_linear applies it to their outputs), recomposed by `ServingGPT` (fused q/k/v, rotary tables of
    `positions` positions precomputed)."""
    model = GPT.from_state(shard_config(cfg, tp), state).eval()
    c = model.hidden_mask
    for block in model.blocks:
        for owner in (block.attn, block.mlp):
            w, b = owner.proj.weight.detach(), owner.proj.bias
            b = None if b is None else b.detach()
            if c is not None:
                w, b = w * c.unsqueeze(-1), None if b is None else b * c
            owner.proj = RowParallelLinear(w, b, reduce=tp > 1)
    model.requires_grad_(False)
    return ServingGPT(model, positions).eval()


class ModelShard:
    """One rank: its slice of the model and its heads' share of the running batch's KV cache (`SlotBatch`).

    A plain class: the engine runs it in-process for tp = 1, `ShardGroup` runs tp of them as Ray actors."""

    def __init__(self, checkpoint: str, rank: int = 0, tp: int = 1, max_batch: int = 16, capacity: int = 0,
                 device: str = "cpu", dtype: str = "float32", threads: int = 0):
        """`threads`: torch's intra-op threads (0: leave as is). Small models decode fastest on one thread: more
        only spin against each other on a busy CPU. `dtype`: float32, bfloat16, float16 or auto (`serving_dtype`).
        On CPU in float32 with `max_batch` >= PACKED_ROWS the projections also get oneDNN-packed copies
        (`ServingGPT.pack`): faster for batches of 4 rows or more, twice their weight memory."""
        if threads:
            torch.set_num_threads(threads)
        self.rank, self.tp, self.max_batch, self.capacity = rank, tp, max_batch, capacity
        self.device, self.dtype = device, serving_dtype(dtype, device)
        self._lock = threading.Lock()  # an actor runs two calls at once (ping answers during a step): not these
        self.load(checkpoint)

    @torch.no_grad()  # per call, not torch.set_grad_enabled(False): an in-process shard shares its thread
    def load(self, checkpoint: str) -> None:
        """Read this rank's slices of `checkpoint` and start an empty batch (also to swap in another checkpoint,
        of any shape the degree divides, without restarting the actors and their process group)."""
        with self._lock:
            self.cfg = read_config(checkpoint)
            state = read_shard_state(checkpoint, self.cfg, self.rank, self.tp)
            self.loaded_numel = sum(t.numel() for t in state.values())
            capacity = self.capacity or 2 * self.cfg.seq_len
            self.model = build_shard(self.cfg, state, self.tp, capacity).to(device=self.device, dtype=self.dtype)
            if self.device == "cpu":
                input_major(self.model)
                if can_pack(self.dtype) and self.max_batch >= PACKED_ROWS:
                    self.model.pack(self.max_batch)
            self.batch = SlotBatch(self.model, self.max_batch, capacity)

    # --- process group ------------------------------------------------------------------------------------------
    @staticmethod
    def free_address() -> str:
        """tcp://ip:port of a free port on this node, for rank 0 to host the group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def join(self, init_method: str, backend: str, timeout_s: float = 120.0) -> None:
        dist.init_process_group(backend, init_method=init_method, rank=self.rank, world_size=self.tp,
                                timeout=timedelta(seconds=timeout_s))

    # --- work -------------------------------------------------------------------------------------------------------
    def step(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor | None:
        """One engine step (see SlotBatch.step); rank 0 returns the logits (float32, CPU), the others None."""
        with self._lock:
            logits = self.batch.step(release, tokens, prompts)
        return logits.float().cpu() if self.rank == 0 else None

    def reset(self) -> None:
        with self._lock:
            self.batch.reset()

    @torch.inference_mode()
    def logits(self, idx: list[list[int]]) -> torch.Tensor | None:
        """Full-sequence logits (B, T, vocab) of equal-length rows, without the cache (tests, scoring)."""
        with self._lock:
            out, _ = self.model(torch.tensor(idx, device=self.model.wte.weight.device))
        return out.float().cpu() if self.rank == 0 else None

    def ping(self) -> int:
        return self.rank

    def info(self) -> dict:
        return {"rank": self.rank, "loaded_numel": self.loaded_numel, "rows": self.batch.rows}


class ShardGroup:
    """`tp` ModelShard actors, one per bundle of a placement group, joined in one torch.distributed group.

    Inside a Serve replica the replica's own placement group is used (Serve creates it from the deployment's
    `placement_group_bundles`); elsewhere the group creates and later removes its own (STRICT_PACK). The calls
    mirror ModelShard's: every rank runs every step, rank 0 answers."""

    def __init__(self, checkpoint: str, tp: int, *, max_batch: int = 16, capacity: int = 0, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, dtype: str = "float32", placement_group=None, ready_timeout_s: float = 300,
                 name: str | None = None):
        """`name`: the actors are named `<name>-shard<rank>` (in the current Ray namespace), so operators and tests
        can find them with `ray list actors` / `ray.get_actor`."""
        import ray
        from ray.util.placement_group import get_current_placement_group, remove_placement_group
        from ray.util.placement_group import placement_group as new_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.cfg = read_config(checkpoint)
        shard_config(self.cfg, tp)  # fail before any actor starts
        self._remove_pg = None
        pg = placement_group or get_current_placement_group()
        if pg is None:
            bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
            pg = new_placement_group([bundle] * tp, strategy="STRICT_PACK")
            ray.get(pg.ready(), timeout=ready_timeout_s)
            self._remove_pg = lambda: remove_placement_group(pg)
        actor = ray.remote(ModelShard)
        device, backend = ("cuda", "nccl") if num_gpus else ("cpu", "gloo")
        self.actors = [
            actor.options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=2,  # ping answers during a step
                          scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i),
                          name=None if name is None else f"{name}-shard{i}")
            .remote(checkpoint, i, tp, max_batch, capacity, device, dtype, max(1, int(num_cpus)))
            for i in range(tp)]
        try:
            if tp > 1:
                address = ray.get(self.actors[0].free_address.remote(), timeout=ready_timeout_s)
                self._gather([a.join.remote(address, backend) for a in self.actors], ready_timeout_s)
            else:
                self._gather([self.actors[0].ping.remote()], ready_timeout_s)
        except Exception:
            self.shutdown()
            raise

    @staticmethod
    def _gather(refs: list, timeout_s: float | None = None) -> list:
        """ray.get that fails as soon as any rank fails: a dead rank leaves the others blocked in an all-reduce,
        and a plain ray.get of rank 0 first would wait for them."""
        import ray

        pending, results = list(refs), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout_s)
            if not ready:
                raise TimeoutError(f"{len(pending)} tensor-parallel ranks did not answer in {timeout_s} s")
            results[ready[0]] = ray.get(ready[0])
        return [results[r] for r in refs]

    def step(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor:
        return self._gather([a.step.remote(release, tokens, prompts) for a in self.actors])[0]

    async def step_async(self, release: list[int], tokens: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """`step` awaited: gather raises as soon as any rank fails, like `_gather`."""
        return (await asyncio.gather(*(a.step.remote(release, tokens, prompts) for a in self.actors)))[0]

    def reset(self) -> None:
        self._gather([a.reset.remote() for a in self.actors])

    def load(self, checkpoint: str) -> None:
        """Every rank swaps in its slices of another checkpoint (the running batch is dropped)."""
        shard_config(read_config(checkpoint), len(self.actors))
        self._gather([a.load.remote(checkpoint) for a in self.actors])
        self.cfg = read_config(checkpoint)

    def logits(self, idx: list[list[int]]) -> torch.Tensor:
        return self._gather([a.logits.remote(idx) for a in self.actors])[0]

    async def logits_async(self, idx: list[list[int]]) -> torch.Tensor:
        """`logits` awaited (the engine's scoring passes, between its steps)."""
        return (await asyncio.gather(*(a.logits.remote(idx) for a in self.actors)))[0]

    def info(self) -> list[dict]:
        return self._gather([a.info.remote() for a in self.actors])

    def check(self, timeout_s: float = 10.0) -> None:
        """Raise if any rank is dead or does not answer (Serve's health check replaces the replica then)."""
        self._gather([a.ping.remote() for a in self.actors], timeout_s)

    def shutdown(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        if self._remove_pg is not None:
            self._remove_pg()
            self._remove_pg = None
