"""Ray Train runs a growth plan: one TorchTrainer run per stage, DDP or DeepSpeed ZeRO workers, elastic and
fault tolerant.

    storage_path/
      <name>/              the run directory (plan.train.out): checkpoints/ in our format, metrics.jsonl, plan.json
      <name>-stage0/       Ray Train's run of stage 0 (its state, and pointers to our checkpoints)
      <name>-stage1/ ...

Stage k is the Ray Train run `<name>-stage<k>` with the stage's own `ScalingConfig` (layout.workers: a count, or
(min, max) for an elastic run; use_gpu; cpus_per_worker). Every worker runs flm/train.py's loop,
`Trainer(plan, dist, hooks=StageHooks(launch)).fit(stages=[k])`: the trainer resumes from the newest checkpoint in the
run directory, so

- growth between stages happens offline, as in FLM-101B: stage k starts from stage k-1's stage-end checkpoint,
  grows it and trains on its own layout (the world size may change between stages);
- a worker failure restarts the worker group (`FailureConfig(max_failures)`) from the latest checkpoint, and an
  elastic resize does the same at the new world size: the global batch and the data order do not depend on it
  (the micro batches per worker and the gradient accumulation steps are recomputed for the new world size);
- relaunching the same name skips the finished stages (those with a stage-end checkpoint) and resumes the
  interrupted one.

Every metric goes to our own stream `<run dir>/metrics.jsonl` (rank 0 writes it); Ray gets a report only at
checkpoints (each costs about a second), with the latest metrics and a pointer to our checkpoint. Each training
record of a Ray Train run also carries `world_size` (the workers of the attempt that trained that step) and
`step_tokens` (the tokens the workers fed into that optimizer step, counted as they are read and summed over
workers: the plan's batch_size x seq_len whatever the world size). Every worker-group start appends one line to
`<run dir>/attempts.jsonl` (stage, step it resumed from, world size, micro batch, accumulation steps, time); a
StageRun lists this launch's attempts.

Elastic stages (layout.workers: [min, max], Ray Train's `ScalingConfig(num_workers=(min, max))`): when a worker
dies, Ray Train restarts the worker group (a failure, counted in max_failures) at the size its elastic policy
counts from the resources Ray Data's AutoscalingCoordinator reserved for it. In Ray 2.60 that actor re-reads the
cluster's nodes only on its 20 s tick (`TICK_INTERVAL_S`, ray/data/_internal/cluster_autoscaler/
default_autoscaling_coordinator.py:333; the elastic policy asks without `recompute`, train/v2/_internal/execution/
scaling_policy/elastic.py:269), so right after a node is lost the restart usually still asks for the old size. Its
placement group then waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s by default, worker_group.py:301) before
Ray Train retries (a controller error, retried without limit), until the coordinator has seen the node go: after
the GCS has declared it dead (5 missed health checks 3 s apart by default) and at its next tick. For elastic stages
run_plan lowers that timeout to ELASTIC_START_TIMEOUT_S unless the environment sets it: a resize then costs a
restart plus that wait rounded up to the timeout (up to about 40 s) instead of a restart plus 60 s.

Storage: the run directory must be one directory that every worker of every stage reads and writes: a local path
on one node; on a multi-node cluster a shared filesystem mounted at the same path on every node (NFS, Lustre), or an
object store URI (s3://bucket/prefix, gs://..., any scheme pyarrow.fs knows). On a URI the run directory is
`<uri>/<name>` and Ray Train's records go to `<uri>/<name>-stage<k>` (RunConfig.storage_filesystem); each worker
stages the run in its node's $FLM_HOME/cache/runs and mirrors checkpoints, metrics.jsonl and attempts.jsonl to the
URI (flm/storage.py), so a worker on a fresh node resumes from the URI. Every node needs the store's credentials in
its own environment (an instance profile, or AWS_* set where `ray start` runs; AWS_ENDPOINT_URL for MinIO and
other S3 APIs): run_plan does not forward secrets to the workers.

The gradient backend of each stage is `layout.backend` ("ddp", "zero1" / "zero2" / "zero3" for DeepSpeed ZeRO, or
"fsdp" for FSDP2 x tensor parallelism over a (workers / tp, tp) mesh with sharded checkpoints: flm/fsdp.py);
`run_plan(backend=...)` overrides it for every stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from flm.checkpoint import MANIFEST, list_checkpoints
from flm.config import FLMConfigError, GrowthPlan, GrowthStage
from flm.storage import RunStorage, check_writable, filesystem, is_uri, join
from flm.train import Trainer, TrainerHooks, batch_split

BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp")
ATTEMPTS = "attempts.jsonl"
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
ELASTIC_START_TIMEOUT_S = 5.0  # placing a worker group on free resources takes milliseconds


@dataclass
class StageRun:
    """What happened to one stage: trained now, or skipped because an earlier launch finished it."""

    stage: int
    status: str  # "trained" | "skipped"
    backend: str | None  # what trained it now (None when skipped: an earlier launch's choice is not recorded)
    workers: int | tuple[int, int]  # the layout's: a count, or (min, max) for an elastic run
    checkpoint: str | None  # our stage-end checkpoint
    seconds: float  # wall clock of the Ray Train run, start-up included (0 when skipped)
    summary: dict | None = None  # Trainer.fit's summary from rank 0 (params, steps, tokens, loss, val_loss, ...)
    ray_path: str | None = None  # Ray Train's run directory
    world_size: int | None = None  # workers in the attempt that finished the stage
    # one per worker-group start of this launch (restarts and elastic resizes add more): stage, step (where it
    # started or resumed), world_size, micro_batch, accum, time (unix seconds)
    attempts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the plan, checked before any training ------------------------------------------------------------------
def stage_backend(stage: GrowthStage, override: str | None = None) -> str:
    backend = override or stage.layout.backend
    if backend not in BACKENDS:
        raise FLMConfigError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    return backend


def worker_range(stage: GrowthStage) -> tuple[int, int]:
    w = stage.layout.workers
    lo, hi = (w, w) if isinstance(w, int) else w
    return lo, hi


def check_plan(plan: GrowthPlan, backend: str | None = None, storage: str | None = None) -> list[str]:
    """What can be checked without a cluster: each stage's backend (returned), its worker counts, its mesh."""
    from flm.parallelize import check_tp

    backends = [stage_backend(s, backend) for s in plan.stages]
    check_layouts(plan)
    for k, (b, cfg) in enumerate(zip(backends, plan.model_configs(), strict=True)):
        if b != "fsdp":
            if plan.stages[k].layout.tp > 1:
                raise FLMConfigError(f"stages.{k}.layout.tp: {plan.stages[k].layout.tp} needs backend fsdp, not {b}")
            continue
        lay = plan.stages[k].layout
        if not isinstance(lay.workers, int) and lay.tp != 1:
            raise FLMConfigError(f"stages.{k}.layout.workers: {lay.workers}: an elastic fsdp stage may only shrink "
                                 f"its dp dimension; use tp: 1 or one worker count")
        check_tp(cfg, lay.tp, f"stages.{k}.layout.tp")
        if storage is not None and is_uri(str(storage)):
            raise FLMConfigError(f"stages.{k}.layout.backend: fsdp writes sharded checkpoints from every rank to "
                                 f"one shared filesystem; --storage {storage} (an object store) is not supported for "
                                 f"it yet: use a shared mount")
    return backends


def check_layouts(plan: GrowthPlan) -> None:
    """Every world size a stage may run at must split its global batch into whole micro batches."""
    for k, stage in enumerate(plan.stages):
        lo, hi = worker_range(stage)
        if lo < 1 or hi < lo:
            raise FLMConfigError(f"stages.{k}.layout.workers: {stage.layout.workers} must be a count >= 1 or "
                                 f"(min, max) with 1 <= min <= max")
        for w in range(lo, hi + 1):
            micro, accum, rest = batch_split(plan, k, w // stage.layout.tp)  # tp ranks read the same batch
            if accum == 0 or rest:
                raise FLMConfigError(f"stages.{k}.layout.workers: batch_size {stage.batch_size} does not split "
                                     f"into micro batches of {micro or 1} on {w} workers; use worker counts that "
                                     f"divide it (or set train.micro_batch_size)")


def check_resources(plan: GrowthPlan, resources: dict[str, float]) -> None:
    """Fail fast when a stage needs more CPUs or GPUs (at its minimum worker count) than the cluster has."""
    for k, stage in enumerate(plan.stages):
        lay, (lo, _) = stage.layout, worker_range(stage)
        need = {"CPU": lo * lay.cpus_per_worker, "GPU": float(lo) if lay.use_gpu else 0.0}
        for kind, amount in need.items():
            have = resources.get(kind, 0.0)
            if amount > have:
                per = f"{lay.cpus_per_worker:g} CPU" if kind == "CPU" else "1 GPU"
                fix = "layout.workers or layout.cpus_per_worker" if kind == "CPU" else "layout.workers or use_gpu"
                raise FLMConfigError(f"stages.{k}.layout: needs {amount:g} {kind}s ({lo} workers x {per} each) but "
                                     f"the Ray cluster has {have:g}; lower {fix}, or add nodes")


def cluster_capacity() -> dict[str, float] | None:
    """The resources the connected cluster can ever have, for `check_resources`: with an autoscaler, the most its
    node types allow (autoscaler v2 reports them to the GCS); None when an autoscaler runs that does not report them
    (v1, the default in Ray 2.60: nodes may come that nobody can count yet); without one, what the cluster has now."""
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    most = state.get_max_resources_from_cluster_config()
    if most:
        return {k: float(v) for k, v in most.items()}
    # The v1 monitor runs on every head; without an autoscaling config it is read-only and names each node's type
    # "node_<id>" (ray.autoscaler._private.util.format_readonly_node_type); with one, after the config's node types.
    status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or "{}")
    types = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    if any(kind != f"node_{node}" for node, kind in types.items()):
        return None
    return ray.cluster_resources()


def check_storage(storage_path: str | os.PathLike) -> Path | str:
    """The storage root as an absolute path (or a URI), created and proven writable before any training starts."""
    text = str(storage_path)
    if is_uri(text):
        try:
            return check_writable(text)
        except (OSError, ValueError) as e:
            raise FLMConfigError(f"storage: cannot write to {text} ({e}); check the bucket, the credentials and "
                                 f"AWS_ENDPOINT_URL") from None
    root = Path(text).expanduser().absolute()
    probe = root / f".flm-write-test-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise FLMConfigError(f"storage: {root} is not a writable directory ({e.strerror or e}); "
                             f"choose another --storage") from None
    return root


def with_run_dir(plan: GrowthPlan, run_dir: Path | str) -> GrowthPlan:
    """The plan with train.out = run_dir, and a local dataset path made absolute (workers may run elsewhere)."""
    data = plan.train.data
    if Path(data).expanduser().is_dir():
        data = str(Path(data).expanduser().absolute())
    train = plan.train.model_copy(update={"out": str(run_dir), "data": data})
    return plan.model_copy(update={"train": train})


def read_run_file(run_dir: Path | str, rel: str) -> str | None:
    """The text of run_dir/rel (a path or a URI), or None if there is none."""
    if is_uri(run_dir):
        return RunStorage(str(run_dir)).read_text(rel)
    path = Path(run_dir) / rel
    return path.read_text() if path.is_file() else None


def check_run_dir(plan: GrowthPlan, run_dir: Path | str) -> None:
    """A run directory holds one plan (the trainer refuses another): say so before a Ray Train run retries it."""
    text = read_run_file(run_dir, "plan.json")
    if text is not None and json.loads(text) != plan.model_dump(mode="json", exclude={"train"}):
        raise FLMConfigError(f"name: {run_dir} holds a run of a different plan; choose another name")


def stage_end(run_dir: Path | str, k: int) -> tuple[Path | str, dict] | None:
    """Stage k's output if a launch finished it: (its stage-end checkpoint, that checkpoint's trainer state).
    Saves are atomic (a directory renamed into place, or on a URI uploaded manifest last); the trainer verifies the
    hashes when it loads one."""
    if is_uri(run_dir):
        storage = RunStorage(str(run_dir))
        names = storage.remote_checkpoints()  # those with a manifest
        states = ((join(run_dir, f"checkpoints/{n}"), storage.read_text(f"checkpoints/{n}/trainer_state.json"))
                  for n in reversed(names))
    else:
        paths = [p for p in reversed(list_checkpoints(run_dir)) if (p / MANIFEST).is_file()]
        states = ((p, read_run_file(p, "trainer_state.json")) for p in paths)
    for path, text in states:
        state = json.loads(text) if text else {}
        if state.get("stage") == k and state.get("stage_end"):
            return path, state
    return None


# --- one Ray Train run per stage ------------------------------------------------------------------------------
class StageHooks(TrainerHooks):
    """What a cluster run adds to flm/train.py's loop: each worker-group start (`fit`) appends its world size and
    batch split to the run directory's attempts.jsonl, and each training record carries the attempt's world size
    and the tokens all workers fed into that optimizer step (counted as read, summed over the workers)."""

    def __init__(self, launch: str = ""):
        self.launch = launch
        self.world_size, self.step_tokens = 1, 0

    def on_start(self, trainer: Trainer) -> None:
        self.world_size = trainer.dist.world_size
        if not trainer.dist.is_main:
            return
        micro, accum, _ = batch_split(trainer.plan, trainer.stage, trainer.dist.data_world)
        line = {"launch": self.launch, "stage": trainer.stage, "step": trainer.step, "world_size": self.world_size,
                "micro_batch": micro, "accum": accum, "time": time.time()}
        if trainer.storage:  # this node's copy may lag the URI's (a restart on another node wrote since)
            trainer.storage.pull_file(ATTEMPTS)
        with open(trainer.run_dir / ATTEMPTS, "a") as f:
            f.write(json.dumps(line) + "\n")
        if trainer.storage:
            trainer.storage.push_file(ATTEMPTS)

    def on_step(self, trainer: Trainer, tokens: int) -> None:
        fed = torch.tensor(tokens, dtype=torch.int64, device=trainer.dist.device)
        self.step_tokens = int(trainer.dist.all_reduce_sum(fed).item())

    def on_record(self, record: dict) -> dict:
        if "loss" in record and "event" not in record:
            return {**record, "world_size": self.world_size, "step_tokens": self.step_tokens}
        return record


def read_attempts(run_dir: str | os.PathLike, launch: str | None = None) -> list[dict]:
    """The worker-group starts logged in a run directory (a path or a URI; those of one launch when given)."""
    lines = [json.loads(line) for line in (read_run_file(run_dir, ATTEMPTS) or "").splitlines()]
    return [a for a in lines if launch is None or a.get("launch") == launch]


def _train_worker(config: dict) -> dict:
    """The train function of every worker of stage `config['stage']`."""
    from cluster.dist import RayDist

    plan, k = GrowthPlan.model_validate(config["plan"]), config["stage"]
    backend = config["backend"]
    if backend == "ddp":
        dist = RayDist.from_context(plan.train.device)
    elif backend == "fsdp":
        from cluster.dist import RayFSDPDist
        from flm.precision import autocast_dtype

        device = "cpu" if plan.train.device == "cpu" else ray.train.torch.get_device().type
        param_dtype = autocast_dtype(device, plan.train.precision) if device == "cuda" else None  # fp32 on CPUs
        dist = RayFSDPDist.from_context(plan.train.device, tp=plan.stages[k].layout.tp, param_dtype=param_dtype,
                                        activation_checkpointing=plan.train.activation_checkpointing == "full")
    else:
        from cluster.zero import ZeroDist

        micro, accum, _ = batch_split(plan, k, ray.train.get_context().get_world_size())
        dist = ZeroDist.from_context(plan.train.device, zero_stage=int(backend[-1]), micro_batch=micro,
                                     accum=accum, grad_clip=plan.train.optim.grad_clip)
    trainer = Trainer(plan, dist, on_record=dist.observe, hooks=StageHooks(config.get("launch", "")))
    return {"summaries": trainer.fit(stages=[k]), "world_size": dist.world_size}


def scaling_config(stage: GrowthStage) -> ScalingConfig:
    lay, (lo, hi) = stage.layout, worker_range(stage)
    resources = {"CPU": lay.cpus_per_worker, **({"GPU": 1} if lay.use_gpu else {})}
    return ScalingConfig(num_workers=lo if lo == hi else (lo, hi), use_gpu=lay.use_gpu,
                         resources_per_worker=resources)


def ray_storage(root: Path | str) -> dict:
    """RunConfig's storage arguments for our storage root. A URI goes as a pyarrow filesystem (flm/storage.py's,
    which honours AWS_ENDPOINT_URL whatever pyarrow's AWS SDK does) and the path inside it."""
    if not is_uri(root):
        return {"storage_path": str(root)}
    filesys, path = filesystem(str(root))
    return {"storage_path": path, "storage_filesystem": filesys}


@contextlib.contextmanager
def _env_default(name: str, value: str):
    """`name=value` in this process's environment for the block, unless it is already set."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def run_plan(plan: GrowthPlan, storage_path: str | os.PathLike, name: str | None = None, *,
             backend: str | None = None, max_failures: int = 3, check_cluster: bool = True,
             on_stage=None) -> list[StageRun]:
    """Train `plan` stage by stage on the connected Ray cluster (flm.connect.connect first); one StageRun per stage.

    `name` (default: the plan's) names the run directory `storage_path/name` and the Ray Train runs
    `name-stage<k>`; launching the same name again continues that run. `backend` overrides every stage's
    `layout.backend`. `max_failures` worker-group restarts are allowed per stage. `on_stage(StageRun)` is called
    after each stage; the resource check compares each stage with what the cluster can ever hold (`cluster_capacity`:
    an autoscaler's maximum, or the nodes up now without one); `check_cluster=False` skips it. The plan's
    `train.out` is replaced by the run directory. User errors (unwritable storage, a
    layout the cluster cannot hold, a batch the workers cannot split, a run directory of another plan) raise
    FLMConfigError before anything trains."""
    root = check_storage(storage_path)
    name = name or plan.name
    if not name or "/" in name or name.startswith("."):
        raise FLMConfigError(f"name: {name!r} must be a plain directory name")
    backends = check_plan(plan, backend, str(root))
    capacity = cluster_capacity() if check_cluster else None
    if capacity is not None:
        check_resources(plan, capacity)
    elif check_cluster:
        warnings.warn("the Ray cluster's autoscaler does not report the most resources it can add (autoscaler v1): "
                      "stage layouts are not checked against the cluster; a stage that cannot fit waits for nodes",
                      stacklevel=2)
    run_dir = join(root, name)
    check_run_dir(plan, run_dir)
    plan = with_run_dir(plan, run_dir)
    runs = []
    for k, stage in enumerate(plan.stages):
        done = stage_end(run_dir, k)
        if done is not None:
            state = done[1]
            summary = {key: state[key] for key in ("stage", "step", "tokens", "flops") if key in state}
            summary["steps"] = summary.pop("step", None)
            run = StageRun(k, "skipped", None, stage.layout.workers, str(done[0]), 0.0, summary)
        else:
            launch = uuid.uuid4().hex
            trainer = TorchTrainer(
                _train_worker,
                train_loop_config={"plan": plan.model_dump(mode="json"), "stage": k, "backend": backends[k],
                                   "launch": launch},
                scaling_config=scaling_config(stage),
                # train.device: cpu on GPU workers (a test cluster with fake GPUs) must not get nccl
                torch_config=TorchConfig(backend="gloo" if plan.train.device == "cpu" else None),
                run_config=RunConfig(name=f"{name}-stage{k}", **ray_storage(root),
                                     failure_config=FailureConfig(max_failures=max_failures),
                                     checkpoint_config=CheckpointConfig(num_to_keep=plan.train.keep_checkpoints)),
            )
            elastic = worker_range(stage)[0] != worker_range(stage)[1]
            t0 = time.perf_counter()
            start_timeout = _env_default(START_TIMEOUT_ENV, str(ELASTIC_START_TIMEOUT_S))
            with start_timeout if elastic else contextlib.nullcontext():
                result = trainer.fit()
            seconds = time.perf_counter() - t0
            done = stage_end(run_dir, k)
            if done is None:
                raise RuntimeError(f"stage {k}: the Ray Train run {result.path} ended without a stage-end checkpoint")
            value = result.return_value or {}
            summaries = value.get("summaries") or [None]
            run = StageRun(k, "trained", backends[k], stage.layout.workers, str(done[0]), seconds, summaries[0],
                           result.path, value.get("world_size"), read_attempts(run_dir, launch))
        runs.append(run)
        if on_stage is not None:
            on_stage(run)
    return runs
