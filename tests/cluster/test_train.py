"""cluster/train.py on a real local Ray cluster (2 CPUs): the micro plan's stages 1 and 2 trained by Ray Train, one
run per stage, from the single-process run's stage-0 checkpoint, equal that run; relaunching skips finished stages;
bad input fails before anything trains; under DeepSpeed ZeRO-2 a worker killed mid-stage is replaced, the stage
matches DDP, and its checkpoints load in one process; FSDP with tp 2 through `flm cluster train`.

Every Ray Train run costs ~25-30 s here before the train function runs (controller, worker actors, imports), so each
test trains as few stages as shows its point: stage 0 on 1 worker is one process and is not run on Ray at all, and
the killed worker is killed in the ZeRO-2 run (tests/cluster/test_fault.py shows the same recovery bit for bit under
DDP, with a whole node lost)."""

import argparse
import contextlib
import json
import os
import shutil
import signal
import threading
import time

import pytest
import ray
import torch
import yaml

from cluster.cli import add_cluster_cli
from cluster.train import run_plan, stage_backend
from flm.checkpoint import list_checkpoints, load_checkpoint
from flm.config import FLMConfigError, GrowthPlan
from flm.connect import check_reachable
from flm.train import Trainer, read_metrics
from tests.conftest import local_ray, micro_plan

TIMING = ("tokens_per_s", "mfu")
# Tolerances against the single-process run (same plan, seed, global batch). Losses: 1e-4 absolute (observed: 5e-7).
# Final float32 state: max |a - b| of each tensor over max |b| <= 1e-3 (observed 3.9e-4, in the attention's key
# bias: its exact gradient is zero, softmax ignores it, so AdamW turns rounding noise into lr-sized steps; the
# single-process run with 2 x 2 gradient accumulation instead of a batch of 4 differs from the reference by 4.6e-4 in
# the same tensor). Optimizer moments: 1e-4 (observed 1e-5). Relative to each tensor's largest value, with a block's
# q, k and v compared as one [q | k | v] tensor, as when they were one fused projection: alone, a new layer's q
# moments (max 7e-10) or the key bias (pure rounding noise) show 1.7e-4 and 4.3e-4 of rounding differences.
LOSS_ATOL = 1e-4
MODEL_RTOL = 1e-3
OPTIM_RTOL = 1e-4


def cluster_plan(data, out="", **train) -> GrowthPlan:
    """The micro plan with stage 0 on 1 worker, stage 1 elastic on 1 to 2 (it gets 2) and stage 2 on 2."""
    d = micro_plan(data, out, **train).model_dump()
    d["stages"][1]["layout"] = {"workers": (1, 2)}
    d["stages"][2]["layout"] = {"workers": 2}
    return GrowthPlan.model_validate(d)


def stream(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def rel_diff(a: dict, b: dict) -> float:
    """Max over tensors of max|a - b| / max|b| (state dicts with the same keys; q, k, v of a block as one)."""
    a, b = fuse_qkv(a), fuse_qkv(b)
    assert a.keys() == b.keys()
    return max(((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item()
               for k in a)


def fuse_qkv(state: dict) -> dict:
    """`...attn.q.X`, `...attn.k.X`, `...attn.v.X` concatenated into `...attn.qkv.X` (the inverse of
    flm.model.split_fused_qkv)."""
    out = {k: v for k, v in state.items() if ".attn.q." not in k and ".attn.k." not in k and ".attn.v." not in k}
    for k in state:
        if ".attn.q." in k:
            prefix, _, rest = k.partition(".attn.q.")
            out[f"{prefix}.attn.qkv.{rest}"] = torch.cat([state[f"{prefix}.attn.{c}.{rest}"] for c in "qkv"])
    return out


def optimizer_tensors(opt_state: dict, cfg) -> dict:
    """AdamW's tensors by "<parameter name>.<key>" (the single-file format numbers parameters: flm.sharded)."""
    from flm.sharded import param_names

    names = param_names(cfg)
    return {f"{names[i]}.{k}": v for i, s in opt_state["state"].items() for k, v in s.items() if v.dim() > 0}


def copy_run_until(src, dst, step: int) -> None:
    """A copy of a run directory as it was right after its checkpoint at `step`."""
    shutil.copytree(src, dst)
    for path in list_checkpoints(dst):
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)
    lines = load_checkpoint(list_checkpoints(dst)[-1]).trainer_state["metrics_lines"]
    metrics = dst / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:lines]))


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray() as resources:
        yield resources


@pytest.fixture(scope="module")
def reference(micro_data, tmp_path_factory):
    """The single-process run of the same plan, seed and global batch."""
    out = tmp_path_factory.mktemp("single")
    Trainer(cluster_plan(micro_data, out)).fit()
    return out


@pytest.fixture(scope="module")
def ddp_run(ray_cluster, reference, micro_data, tmp_path_factory):
    """Stages 1 (elastic, 1 to 2 workers: it gets 2) and 2 (2 workers) under DDP on Ray Train, continuing the
    single-process run from its stage-0 checkpoint, as a user moves a run to a cluster."""
    storage = tmp_path_factory.mktemp("storage")
    copy_run_until(reference, storage / "micro", 12)
    t0 = time.perf_counter()
    runs = run_plan(cluster_plan(micro_data), storage, "micro", max_failures=0)
    print(f"\nDDP run of the micro plan on Ray Train: {time.perf_counter() - t0:.1f} s "
          f"({', '.join(f'stage {r.stage} {r.seconds:.1f} s' for r in runs)})")
    return storage, runs


def test_ddp_run_equals_the_single_process_run(ddp_run, reference):
    storage, runs = ddp_run
    run_dir = storage / "micro"
    assert [(r.stage, r.status, r.backend, r.workers, r.world_size) for r in runs] == [
        (0, "skipped", None, 1, None), (1, "trained", "ddp", (1, 2), 2), (2, "trained", "ddp", 2, 2)]
    assert [r.summary["steps"] for r in runs] == [12, 24, 36]
    assert runs[-1].checkpoint.endswith("step_00000036")
    # the metric stream (rank 0's) has every step once, the growth events, and the same numbers
    ours, ref = stream(run_dir), stream(reference)
    assert [(r["step"], r.get("event")) for r in ours] == [(r["step"], r.get("event")) for r in ref]
    final, single = load_checkpoint(runs[-1].checkpoint), load_checkpoint(reference / "checkpoints/step_00000036")
    dloss = max(abs(a - b) for a, b in zip(losses(run_dir), losses(reference), strict=True))
    dmodel = rel_diff(final.model, single.model)
    doptim = rel_diff(optimizer_tensors(final.optimizer, final.config),
                      optimizer_tensors(single.optimizer, single.config))
    print(f"\nDDP vs one process: max |dloss| {dloss:.1e}, model {dmodel:.1e}, AdamW moments {doptim:.1e} (relative)")
    assert losses(run_dir) == pytest.approx(losses(reference), abs=LOSS_ATOL)
    assert final.config == single.config and final.trainer_state["step"] == 36
    assert dmodel <= MODEL_RTOL and doptim <= OPTIM_RTOL
    # Ray kept a pointer to our checkpoint for each stage, next to our run directory
    assert all(os.path.isdir(r.ray_path) and r.ray_path.startswith(str(storage)) for r in runs[1:])


def test_relaunch_skips_finished_stages(ddp_run, micro_data):
    storage, runs = ddp_run
    before = (storage / "micro" / "metrics.jsonl").read_text()
    t0 = time.perf_counter()
    again = run_plan(cluster_plan(micro_data), storage, "micro")
    assert [r.status for r in again] == ["skipped"] * 3
    assert [r.checkpoint for r in again] == [r.checkpoint for r in runs]
    assert [r.summary["steps"] for r in again] == [12, 24, 36]
    assert time.perf_counter() - t0 < 5  # no Ray Train run started
    assert (storage / "micro" / "metrics.jsonl").read_text() == before


def test_bad_input_fails_before_training(ray_cluster, micro_data, tmp_path):
    plan = cluster_plan(micro_data)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(FLMConfigError, match="not a writable directory"):
        run_plan(plan, afile / "runs", "micro")

    def with_layout(k: int, **layout) -> GrowthPlan:
        d = plan.model_dump()
        d["stages"][k]["layout"] = layout
        return GrowthPlan.model_validate(d)

    cases = [(with_layout(2, workers=4), r"stages\.2\.layout: needs 4 CPUs \(4 workers x 1 CPU each\) but the Ray "
                                         r"cluster has 2"),
             (with_layout(1, workers=1, cpus_per_worker=4), r"stages\.1\.layout: needs 4 CPUs"),
             (with_layout(0, use_gpu=True), r"stages\.0\.layout: needs 1 GPUs .* the Ray cluster has 0"),
             (with_layout(1, workers=[1, 3]), r"stages\.1\.layout\.workers: batch_size 4 does not split .* 3 workers")]
    for bad, message in cases:
        with pytest.raises(FLMConfigError, match=message) as e:
            run_plan(bad, tmp_path / "storage", "micro")
        assert "\n" not in str(e.value)
    with pytest.raises(FLMConfigError, match="backend"):
        run_plan(plan, tmp_path / "storage", "micro", backend="zero4")
    assert not (tmp_path / "storage" / "micro").exists()  # nothing started
    (tmp_path / "storage" / "micro").mkdir()
    (tmp_path / "storage" / "micro" / "plan.json").write_text(json.dumps({"stages": []}))
    with pytest.raises(FLMConfigError, match="holds a run of a different plan"):
        run_plan(plan, tmp_path / "storage", "micro")


def cluster_cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flm")
    add_cluster_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_rejects_bad_input_before_ray(micro_data, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(cluster_plan(micro_data).model_dump(mode="json")))
    (tmp_path / "afile").write_text("")
    cases = [([str(plan_file), "--storage", str(tmp_path / "afile" / "x")], "storage: .* is not a writable directory"),
             ([str(tmp_path / "missing.yaml")], "no such file"),
             ([str(plan_file), "--storage", str(tmp_path), "--backend", "zero4"], "backend: 'zero4' is not one of"),
             ([str(plan_file), "--storage", str(tmp_path), "--max-failures", "-2"], "--max-failures")]
    for argv, message in cases:
        args = cluster_cli().parse_args(["cluster", "train", *argv])
        with pytest.raises(FLMConfigError, match=message):
            args.func(args)
    with pytest.raises(FLMConfigError, match="--address: nothing answers at 127.0.0.1:1"):
        check_reachable("127.0.0.1:1")  # before ray.init, which would retry for minutes


def test_cli_summarises_a_finished_run(ddp_run, micro_data, tmp_path, capsys):
    storage, _ = ddp_run
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(cluster_plan(micro_data).model_dump(mode="json")))
    args = cluster_cli().parse_args(["cluster", "train", str(plan_file), "--storage", str(storage), "--name", "micro",
                                     "--json"])
    args.func(args)  # a finished run needs no cluster: nothing is started, the test's cluster is left alone
    runs = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["status"]) for r in runs] == [(0, "skipped"), (1, "skipped"), (2, "skipped")]
    assert ray.is_initialized()


def test_stage_backend_comes_from_the_layout():
    stage = {"tokens": 128, "lr": 1e-3, "batch_size": 4, "model": {"n_layer": 1, "d_model": 8, "n_head": 2,
                                                                    "vocab_size": 16, "seq_len": 8}}
    plan = GrowthPlan.model_validate({"stages": [{**stage, "layout": {"backend": "zero3"}}]})
    assert stage_backend(plan.stages[0]) == "zero3"
    assert stage_backend(plan.stages[0], "ddp") == "ddp"


def _train_workers(since: float) -> list:
    """Our cluster's live Ray Train worker processes started after `since` (other Ray clusters on this host, and
    the exiting workers of earlier runs, are left alone)."""
    import psutil

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    workers = []
    for p in psutil.Process(raylet).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # exited meanwhile
            if (p.create_time() >= since and p.status() != psutil.STATUS_ZOMBIE
                    and "RayTrainWorker" in " ".join(p.cmdline())):
                workers.append(p)
    return workers


def _steps(metrics) -> list[int]:
    """Steps of the records in a metric stream being written (a half-written last line is skipped)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            steps.append(json.loads(line).get("step", 0))
    return steps


def test_zero2_worker_killed_mid_stage_is_replaced_and_the_stage_matches_ddp(ddp_run, micro_data, tmp_path):
    """Stage 2 (2 workers, width growth and mask ramp) under DeepSpeed ZeRO-2, grown from the DDP run's stage-1
    output. One worker is SIGKILLed after step 27 (last checkpoint: 25): Ray Train restarts the worker group, the
    trainer resumes from step 25 (mid-ramp) and the stage ends as DDP's did. Its checkpoints are ours (one full state
    dict, equal to DDP's), and a single process resumes from one written by the 2 ZeRO workers."""
    storage, _ = ddp_run
    copy_run_until(storage / "micro", tmp_path / "micro", 24)
    metrics = tmp_path / "micro" / "metrics.jsonl"
    events: dict[str, float] = {}
    since = time.time()

    def kill_then_watch() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "killed" not in events:
            if max(_steps(metrics), default=0) >= 27:
                victims = _train_workers(since)
                if victims:
                    os.kill(victims[0].pid, signal.SIGKILL)
                    events["killed"] = time.monotonic()
            time.sleep(0.02)
        low = len(_steps(metrics))
        while time.monotonic() < deadline and "resumed" not in events:  # the stream is cut back, then grows again
            steps = _steps(metrics)
            if len(steps) < low:
                low, events["truncated"] = len(steps), time.monotonic()
            elif "truncated" in events and len(steps) > low:
                events["resumed"], events["resumed_at"] = time.monotonic(), steps[-1]
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_then_watch, daemon=True)
    watcher.start()
    runs = run_plan(cluster_plan(micro_data), tmp_path, "micro", backend="zero2", max_failures=1)
    watcher.join(timeout=5)
    assert "killed" in events, "the run ended before a worker could be killed"
    assert [(r.status, r.backend) for r in runs] == [("skipped", None), ("skipped", None), ("trained", "zero2")]
    assert "resumed" in events
    starts = [a["step"] for a in runs[2].attempts]
    print(f"\nZeRO-2 worker killed after step 27: training resumed (step {events['resumed_at']:.0f}) "
          f"{events['resumed'] - events['killed']:.1f} s later; worker-group starts at steps {starts}; stage 2 took "
          f"{runs[2].seconds:.1f} s in all")
    assert starts == [24, 25]
    # every step once, the same events, DDP's losses
    ours, ddp = stream(tmp_path / "micro"), stream(storage / "micro")
    assert [(r["step"], r.get("event")) for r in ours] == [(r["step"], r.get("event")) for r in ddp]
    zero, want = losses(tmp_path / "micro"), losses(storage / "micro")
    print(f"ZeRO-2 vs DDP: max |dloss| = {max(abs(a - b) for a, b in zip(want, zero, strict=True)):.1e}")
    assert zero == pytest.approx(want, abs=LOSS_ATOL)
    # the checkpoint is ours: one full state dict, equal to DDP's
    final, ref = load_checkpoint(runs[-1].checkpoint), load_checkpoint(storage / "micro/checkpoints/step_00000036")
    assert rel_diff(final.model, ref.model) <= MODEL_RTOL
    assert final.optimizer["param_groups"] == ref.optimizer["param_groups"]
    assert rel_diff(optimizer_tensors(final.optimizer, final.config),
                    optimizer_tensors(ref.optimizer, ref.config)) <= OPTIM_RTOL
    # and a checkpoint written by 2 ZeRO workers after the restart resumes in a single process
    copy_run_until(tmp_path / "micro", tmp_path / "single", 30)
    Trainer(cluster_plan(micro_data, tmp_path / "single")).fit()
    assert losses(tmp_path / "single") == pytest.approx(want, abs=LOSS_ATOL)


def test_fsdp_tp2_plan_through_the_cli(ray_cluster, micro_data, tmp_path, capsys):
    """Two stages with backend fsdp, tp 2 (heads and FFN units split over the 2 workers), through `flm cluster train`:
    sharded checkpoints, offline growth of a sharded model between the Ray Train runs, and the same losses as one
    process (1e-5)."""
    d = micro_plan(micro_data, "").model_dump(mode="json")
    d["stages"] = d["stages"][:2]
    for stage in d["stages"]:
        stage["layout"] = {"workers": 2, "tp": 2, "backend": "fsdp"}
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(yaml.safe_dump(d))
    storage, reference = tmp_path / "storage", tmp_path / "single"
    # a shared start (FSDP initialises its own shards, one process the whole tensors: different random weights)
    Trainer(GrowthPlan.model_validate({**d, "train": {**d["train"], "out": str(storage / "micro")}})).fit(
        stages=[0], max_steps=5)
    shutil.copytree(storage / "micro", reference)
    args = cluster_cli().parse_args(["cluster", "train", str(plan_file), "--storage", str(storage), "--json"])
    args.func(args)
    runs = json.loads(capsys.readouterr().out)
    assert [(r["stage"], r["status"], r["backend"], r["world_size"]) for r in runs] == \
        [(0, "trained", "fsdp", 2), (1, "trained", "fsdp", 2)]
    run_dir = storage / "micro"
    assert all((p / "sharded").is_dir() for p in list_checkpoints(run_dir) if p.name != "step_00000005")
    Trainer(GrowthPlan.model_validate({**d, "train": {**d["train"], "out": str(reference)}})).fit()
    got, want = losses(run_dir), losses(reference)
    assert len(got) == len(want) == 24 and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5
