"""cluster/train.py on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a head node and worker nodes of
1 CPU each, every node its own raylet on this machine) that loses a node in the middle of a stage:

- fault tolerance: a fixed 2-worker stage, FailureConfig(max_failures=1); the node of one worker is killed (its
  raylet and everything on it SIGKILLed). Ray Train restarts the 2-worker group on the nodes left (the cluster
  keeps a spare node, as a cluster whose autoscaler replaces lost nodes would), the trainer resumes from the last
  checkpoint, and the metric stream and the final weights are bit-identical to the uninterrupted run's;
- elasticity: a stage with layout.workers [1, 2] (ScalingConfig(num_workers=(1, 2))) on a head + 1 worker node;
  the worker node is killed and the stage finishes on 1 worker with the plan's global batch (2 accumulation steps
  of the same micro batch instead of 2 workers), losses within float tolerance of the uninterrupted run.

The uninterrupted run is the same plan in one process, 2 micro batches accumulated per step: bit-identical to the
2-worker DDP run (see `reference`), so it serves both tests and costs no Ray Train start-up. Both tests print the
recovery time: from the kill to the first training step written after the resume.

This module starts its own Ray cluster (its own GCS): it cannot share a process with another module's
`ray.init(address="local")`, so its cluster lives only while its tests run.
"""

import contextlib
import json
import threading
import time

import psutil
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.train import ATTEMPTS, StageHooks, run_plan
from flm.checkpoint import load_checkpoint
from flm.config import GrowthPlan
from flm.connect import connect
from flm.train import Trainer, read_metrics
from tests.conftest import micro_plan, ray_test_env, release_local_ray, start_ray_node

TIMING = ("tokens_per_s", "mfu")
# The GCS declares a silent node dead after 3 missed health checks 1 s apart (Ray's default: 5 x 3 s). Only the
# elastic restart waits for it: its size comes from the nodes the GCS still lists (see cluster/train.py).
GCS_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
STEPS, CHECKPOINT_EVERY, BATCH, SEQ = 30, 10, 4, 32
KILL_AFTER = 12  # the checkpoint of step 10 exists once step 11 is in the stream
# Elastic: after the resize the same samples are summed in another order (2 micro batches accumulated on one worker
# instead of one micro batch on each of 2 workers, all-reduced), so losses agree to float32 rounding, not bit for
# bit. Tolerances: loss 1e-4 absolute per step; final weights max|a - b| / max|b| per tensor <= 1e-3 (see
# tests/cluster/test_train.py for why attention key biases wander by ~4e-4).
LOSS_ATOL = 1e-4
MODEL_RTOL = 1e-3


def stage_plan(data, out="", workers=2) -> GrowthPlan:
    """One stage of the micro model: 30 steps of 4 sequences of 32 tokens, a checkpoint every 10 steps, micro
    batches of 2 sequences (1 per step on each of 2 workers, 2 accumulated on 1 worker)."""
    d = micro_plan(data, out).model_dump()
    d["stages"] = d["stages"][:1]
    d["stages"][0].update(tokens=STEPS * BATCH * SEQ, batch_size=BATCH, layout={"workers": workers})
    d["train"].update(checkpoint_every=CHECKPOINT_EVERY, micro_batch_size=2)
    return GrowthPlan.model_validate(d)


def stream(run_dir, drop=TIMING + ("world_size",)) -> list[dict]:
    """The metric stream without timings and world sizes (the reference ran in one process)."""
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run_dir)]


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item()
               for k in a)


@pytest.fixture(scope="module")
def reference(micro_data, tmp_path_factory):
    """The uninterrupted run, in this process: micro batches of 2 accumulated twice per step, one thread (as a Ray
    worker with 1 CPU). Bit-identical to the 2-worker DDP run: the gradient is (g0 + g1) / 2 either way (halving
    is exact in floating point) and the two micro batches' losses are summed in the same order."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(stage_plan(micro_data, out), hooks=StageHooks()).fit()
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def multinode():
    """A head node (1 CPU; the driver and Ray Train's controller live there) and 2 worker nodes of 1 CPU."""
    release_local_ray()  # a module before this one may have left its local cluster running
    with ray_test_env():
        cluster = Cluster()
        start_ray_node(lambda: cluster.add_node(num_cpus=1, include_dashboard=False, _system_config=GCS_CONFIG))
        use_worker_nodes(cluster, 2)
        connect(ray, cluster.address, log_to_driver=False)
        yield cluster
        ray.shutdown()
        cluster.shutdown()


def use_worker_nodes(cluster: Cluster, n: int) -> None:
    """Exactly n live worker nodes (added from the main thread: a Ray node installs signal handlers)."""
    while len(cluster.worker_nodes) > n:
        cluster.remove_node(next(iter(cluster.worker_nodes)))
    while len(cluster.worker_nodes) < n:
        start_ray_node(lambda: cluster.add_node(num_cpus=1))


def _lines(path) -> list[dict]:
    """The records of a JSON-lines file being written (a half-written last line is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def _steps(metrics) -> list[int]:
    return [r.get("step", 0) for r in _lines(metrics)]


def _spawned(node) -> list[psutil.Process]:
    """The processes a node's raylet started (workers and actors)."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(node.all_processes["raylet"][0].process.pid).children(recursive=True)
    return []


def _hosts_a_train_worker(node) -> bool:
    for p in _spawned(node):
        with contextlib.suppress(psutil.Error):
            if p.status() != psutil.STATUS_ZOMBIE and "RayTrainWorker" in " ".join(p.cmdline()):
                return True
    return False


def kill_node(cluster: Cluster, node) -> None:
    """Everything on the node dies at once, as when a machine fails: the processes its raylet started (a Ray worker
    outlives its raylet until it next needs it), then the node's own (raylet, object store, agents), SIGKILL."""
    for p in _spawned(node):
        with contextlib.suppress(psutil.Error):
            p.kill()
    cluster.remove_node(node, allow_graceful=False)


class NodeKiller(threading.Thread):
    """Once the metric stream of `run_dir` reaches `after` steps, kills a worker node that hosts a Ray Train worker
    (`kill_node`); then waits for the restarted attempt (its line in
    attempts.jsonl, written after the stream was cut back to the checkpoint it resumes from) and for its first
    step in the stream."""

    def __init__(self, cluster: Cluster, run_dir, after: int, timeout: float = 300):
        super().__init__(daemon=True)
        self.cluster, self.run_dir, self.after, self.timeout = cluster, run_dir, after, timeout
        self.events: dict[str, float] = {}

    def run(self) -> None:
        deadline, ev, metrics = time.monotonic() + self.timeout, self.events, self.run_dir / "metrics.jsonl"
        while time.monotonic() < deadline and "killed" not in ev:
            if max(_steps(metrics), default=0) >= self.after:
                victims = [n for n in list(self.cluster.worker_nodes) if _hosts_a_train_worker(n)]
                if victims:
                    ev["killed_at"] = max(_steps(metrics))
                    ev["killed"], ev["killed_wall"] = time.monotonic(), time.time()
                    kill_node(self.cluster, victims[0])
                    ev["removed"] = time.monotonic()
                    break
            time.sleep(0.01)
        ev["last_step"] = max(_steps(metrics), default=0)
        while time.monotonic() < deadline and "killed" in ev and "resumed_from" not in ev:
            attempts = _lines(self.run_dir / ATTEMPTS)
            if len(attempts) >= 2:
                ev["resumed_from"], ev["restored"] = attempts[1]["step"], attempts[1]["time"] - ev["killed_wall"]
            else:
                ev["last_step"] = max([ev["last_step"], *_steps(metrics)])
                time.sleep(0.01)
        while time.monotonic() < deadline and "resumed_from" in ev and "resumed" not in ev:
            if ev["resumed_from"] + 1 in _steps(metrics):
                ev["resumed"] = time.monotonic()
            time.sleep(0.01)

    def recovery(self) -> float:
        """Seconds from the kill to the first training step of the restarted attempt in the stream."""
        return self.events["resumed"] - self.events["killed"]

    def describe(self) -> str:
        ev = self.events
        return (f"worker node killed after step {ev['killed_at']:.0f} (its processes gone in "
                f"{ev['removed'] - ev['killed']:.2f} s, last step written {ev['last_step']:.0f}); the restarted "
                f"worker group restored step {ev['resumed_from']:.0f} {ev['restored']:.1f} s after the kill and wrote "
                f"its first step {self.recovery():.1f} s after the kill")


def _train_records(run_dir, drop=TIMING + ("world_size",)) -> list[dict]:
    return [r for r in stream(run_dir, drop) if "loss" in r]


def optimizer_tensors(opt_state: dict) -> dict:
    return {f"{i}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items()}


def test_killed_node_under_a_fixed_stage_recovers_exactly(multinode, reference, micro_data, tmp_path):
    use_worker_nodes(multinode, 2)  # 3 CPUs: 2 workers, and a node to spare when one is killed
    killer = NodeKiller(multinode, tmp_path / "fixed", after=KILL_AFTER)
    killer.start()
    runs = run_plan(stage_plan(micro_data, workers=2), tmp_path, "fixed", max_failures=1)
    killer.join(timeout=5)
    ev = killer.events
    assert "killed" in ev, "the stage ended before a node could be killed"
    assert "resumed" in ev
    (run,) = runs
    assert (run.status, run.world_size) == ("trained", 2)
    first, again = run.attempts
    assert (first["step"], first["world_size"], again["world_size"]) == (0, 2, 2)
    # resumed from the newest checkpoint before the kill: at most one checkpoint interval of steps redone
    assert again["step"] % CHECKPOINT_EVERY == 0
    assert 0 <= ev["last_step"] - again["step"] < CHECKPOINT_EVERY
    assert ev["resumed_from"] == again["step"]
    print(f"\nfixed 2-worker stage: {killer.describe()}; the stage took {run.seconds:.1f} s in all")
    ref = reference
    assert {r["world_size"] for r in _train_records(tmp_path / "fixed", TIMING)} == {2}
    assert stream(tmp_path / "fixed") == stream(ref)
    final, single = load_checkpoint(run.checkpoint), load_checkpoint(ref / "checkpoints/step_00000030")
    assert rel_diff(final.model, single.model) == 0.0
    assert rel_diff(optimizer_tensors(final.optimizer), optimizer_tensors(single.optimizer)) == 0.0


def test_elastic_stage_continues_on_one_worker_with_the_same_global_batch(multinode, reference, micro_data,
                                                                          tmp_path):
    use_worker_nodes(multinode, 1)  # 2 CPUs: the elastic stage gets its maximum, 2 workers
    killer = NodeKiller(multinode, tmp_path / "elastic", after=KILL_AFTER)
    killer.start()
    runs = run_plan(stage_plan(micro_data, workers=(1, 2)), tmp_path, "elastic", max_failures=1)
    killer.join(timeout=5)
    ev = killer.events
    assert "killed" in ev, "the stage ended before a node could be killed"
    assert "resumed" in ev
    (run,) = runs
    assert (run.status, run.workers, run.world_size) == ("trained", (1, 2), 1)
    first, resized = run.attempts
    assert {k: first[k] for k in ("step", "world_size", "micro_batch", "accum")} == \
        {"step": 0, "world_size": 2, "micro_batch": 2, "accum": 1}
    assert {k: resized[k] for k in ("world_size", "micro_batch", "accum")} == \
        {"world_size": 1, "micro_batch": 2, "accum": 2}
    assert resized["step"] % CHECKPOINT_EVERY == 0 and 0 <= ev["last_step"] - resized["step"] < CHECKPOINT_EVERY
    # every step fed the plan's global batch, on 2 workers up to the resume point and on 1 after it
    records = _train_records(tmp_path / "elastic", TIMING)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {r["step_tokens"] for r in records} == {BATCH * SEQ}
    assert [r["world_size"] for r in records] == [2] * resized["step"] + [1] * (STEPS - resized["step"])
    assert [r["tokens"] for r in records] == [BATCH * SEQ * s for s in range(1, STEPS + 1)]
    ref = reference
    ours, theirs = _train_records(tmp_path / "elastic"), _train_records(ref)
    cut = resized["step"]
    assert ours[:cut] == theirs[:cut]  # up to the resize: 2-worker DDP, bit-identical to the reference
    after = [abs(a["loss"] - b["loss"]) for a, b in zip(ours[cut:], theirs[cut:], strict=True)]
    final, single = load_checkpoint(run.checkpoint), load_checkpoint(ref / "checkpoints/step_00000030")
    dmodel = rel_diff(final.model, single.model)
    print(f"\nelastic (1, 2) stage: {killer.describe()}, on 1 worker (2 micro batches accumulated); max |dloss| "
          f"after the resize {max(after):.1e}, final weights {dmodel:.1e} (relative); the stage took "
          f"{run.seconds:.1f} s in all")
    assert max(after) <= LOSS_ATOL
    assert dmodel <= MODEL_RTOL
    # the attempts log keeps every worker-group start of the run directory
    assert len((tmp_path / "elastic" / ATTEMPTS).read_text().splitlines()) == 2
