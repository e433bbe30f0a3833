"""Autoscaling with the real Ray autoscaler (v1 monitor) and its fake node provider: a growth stage that needs two
GPU workers when no GPU node is up makes the autoscaler add two (fake GPU) nodes, the stage trains on them (on the
CPU: the plan says train.device: cpu), and the idle nodes go away after idle_timeout_minutes.

The cluster is started here by hand, not with `ray.cluster_utils.AutoscalingCluster`: its start() and shutdown()
run `ray stop --force`, which kills every Ray process on the host. Ours is a `ray start --head --block` in its own
temp dir; at the end it gets SIGTERM and every process whose command line names that temp dir (the fake nodes are
children of the autoscaler monitor and can outlive it) is killed by PID.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray

from cluster.train import cluster_capacity, run_plan
from flm.config import GrowthPlan
from flm.connect import connect
from flm.train import Trainer, read_metrics
from tests.cluster.test_train import LOSS_ATOL
from tests.conftest import RAY_TEST_ENV, micro_plan, release_local_ray

IDLE_TIMEOUT_MIN = 0.1  # 6 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str) -> dict:
    """A head of 1 CPU and up to two "gpu_worker" nodes of 1 CPU + 1 GPU each, as a fake_multinode cluster."""
    return {
        "cluster_name": "flm-fake", "max_workers": 2, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_MIN,
        # without gcs_address the fake nodes dial the default port 6379; a fake node has nothing to set up (no
        # updater: it would try to tag the read-only provider's node and the launch would count as failed)
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"}, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {}, "min_workers": 0,
                           "max_workers": 2},
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def _kill_tree(head: subprocess.Popen, marker: str) -> None:
    """Stop our head, then every process left that names our temp dir: only what this module started."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(10)
    except subprocess.TimeoutExpired:
        head.kill()
    for _ in range(3):
        out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
        pids = [int(p) for p in out if int(p) != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(1)


@pytest.fixture(scope="module")
def autoscaling_cluster():
    release_local_ray()  # a module before this one may have left its local cluster running
    temp = Path(tempfile.mkdtemp(prefix="flm-as-"))  # short: Ray's socket paths live under it
    port = free_port()
    config = autoscaling_config(f"{ray._private.services.get_node_ip_address()}:{port}")
    (temp / "autoscaler.json").write_text(json.dumps(config))
    env = {**os.environ, **RAY_TEST_ENV, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with open(temp / "head.log", "w") as log:
        head = subprocess.Popen(
            [ray_bin, "start", "--head", "--block", f"--port={port}", f"--temp-dir={temp}", "--num-cpus=1",
             "--num-gpus=0", "--include-dashboard=false", f"--autoscaling-config={temp / 'autoscaler.json'}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    mp = pytest.MonkeyPatch()
    for k, v in RAY_TEST_ENV.items():
        mp.setenv(k, v)
    try:
        deadline = time.monotonic() + 120  # a loaded machine: the head takes its time
        while True:
            try:
                connect(ray, f"127.0.0.1:{port}", log_to_driver=False)
                break
            except Exception as e:
                if time.monotonic() > deadline or head.poll() is not None:
                    log = (temp / "head.log").read_text()[-3000:]
                    raise RuntimeError(f"the Ray head did not come up:\n{log}") from e
                time.sleep(2)
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        while not _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS):  # the monitor's first update
            assert time.monotonic() < deadline, "the autoscaler did not report"
            time.sleep(1)
        yield temp
    finally:
        ray.shutdown()
        _kill_tree(head, str(temp))
        mp.undo()
        shutil.rmtree(temp, ignore_errors=True)


def gpu_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Resources"].get("GPU") and n["Alive"]]


def test_growth_stage_scales_the_cluster_up_and_idle_nodes_go(autoscaling_cluster, micro_data, tmp_path):
    # stage 1, the grown model, wants 2 GPU workers; stage 0 is trained beforehand without Ray (a relaunch skips a
    # finished stage: one Ray Train run less on a slow machine)
    data = micro_plan(micro_data, tmp_path / "ref").model_dump(mode="json")
    data["stages"] = data["stages"][:2]
    data["stages"][1]["layout"] = {"workers": 2, "use_gpu": True, "cpus_per_worker": 1}
    reference = GrowthPlan.model_validate(data)
    Trainer(reference).fit(stages=[0])
    run_dir = tmp_path / "storage" / "as"
    shutil.copytree(tmp_path / "ref", run_dir)
    Trainer(reference).fit(stages=[1])  # the local reference of stage 1 (resumes bit-identically: test_train.py)

    # the autoscaler (v1) does not report its maximum: the check is skipped, with a warning, rather than refusing a
    # stage for nodes that are not up yet
    assert ray.cluster_resources().get("GPU", 0) == 0 and not gpu_nodes()
    assert cluster_capacity() is None
    t0 = time.monotonic()
    with pytest.warns(UserWarning, match="autoscaler does not report"):
        runs = run_plan(reference, tmp_path / "storage", name="as")
    trained = time.monotonic() - t0
    assert [(r.status, r.world_size) for r in runs] == [("skipped", None), ("trained", 2)]
    # the GPU nodes the autoscaler added for stage 1 (both fake: 1 CPU + 1 GPU each)
    added = [n for n in ray.nodes() if n["Resources"].get("GPU")]
    assert len(added) == 2 and all(n["Resources"]["GPU"] == 1 for n in added)

    # stage 1 on 2 DDP workers (gloo, CPU) trained as the single-process reference did, to float tolerance
    def losses(path):
        return [r["loss"] for r in read_metrics(path) if "loss" in r and r["stage"] == 1]

    assert len(losses(run_dir)) == 12
    assert losses(run_dir) == pytest.approx(losses(tmp_path / "ref"), abs=LOSS_ATOL)

    # idle nodes go away after idle_timeout_minutes (plus the monitor's update interval and the GCS noticing)
    t1 = time.monotonic()
    while gpu_nodes() and time.monotonic() - t1 < 120:
        time.sleep(1)
    scaled_down = time.monotonic() - t1
    assert not gpu_nodes() and ray.cluster_resources().get("GPU", 0) == 0
    print(f"scale-up + stage 1: {trained:.0f} s; scale-down after the last stage: {scaled_down:.0f} s")
