"""`make compose-check`: the container stack of docker-compose.yml run for real on this host, as a new user runs it.

Builds the image, brings up a Ray head, 2 workers, the gateway and PostgreSQL, creates an API key, submits the tiny
pipeline (3 growth stages on Ray Train -> IQ suite -> TP = 2 deployment) through the published gateway port and gets
a completion with the official `openai` client; then the failures a deployment meets:
- a worker container killed (`docker kill`) mid-stage: Ray Train restarts the stage's worker group on what is left
  and the trainer resumes from the stage's last checkpoint; the job still succeeds;
- the gateway container restarted: no job lost (the PostgreSQL store);
- `--scale worker=3`: the new worker joins Ray (`ray status` on the head);
- security: only the gateway is published (Ray's dashboard and Serve are not reachable from the host's ports), and
  Ray's dashboard answers no request without the token, even on the compose network's address;
- `down`: nothing of the stack left running.
Prints a timing table, writes benchmarks/results/compose_check.json, exits 1 on any failed check (2 on bad input).

Where no container registry answers (this machine kind), the base images are made locally: Debian bookworm by
`debootstrap` (with this host's CA certificates, which its TLS-intercepting egress needs), python3.11 in a venv as
`python` (docker/local-python.Dockerfile), PostgreSQL 15 started as the official image starts
(docker/local-postgres.Dockerfile); torch's CPU wheel comes from this machine's pip configuration into
docker/wheels/. Needs root (it installs docker.io, docker-compose and debootstrap with apt-get when missing and
starts dockerd when none runs). Compose v1 (Debian's docker-compose 1.29) and v2 both read the file.
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.demo import PROMPT, pipeline_request  # noqa: E402

PROJECT = "flmcheck"
IMAGE = "flm/flm:0.1.0"
GATEWAY = "http://127.0.0.1:8080"
DEBIAN = "flm/debian-local:bookworm"
LOCAL_PYTHON, LOCAL_POSTGRES = "flm/local-python:3.11", "flm/local-postgres:15"
TORCH = "torch==2.13.0"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# set by ensure_tools (the docker client, the compose command) and main (the stack's secrets, POSTGRES_IMAGE)
DOCKER, COMPOSE = "docker", None
ENV: dict[str, str] = {}


class CheckFailed(Exception):
    pass


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def sh(*cmd: str, timeout: float = 1800, env: dict | None = None, capture: bool = True, check: bool = True,
       stdin=None) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                       stdin=stdin)
    if check and p.returncode:
        raise CheckFailed(f"{' '.join(cmd)[:200]} exited {p.returncode}: {(p.stderr or p.stdout or '')[-2000:]}")
    return p


def docker(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh(DOCKER, *args, **kw)


# --- tools ------------------------------------------------------------------------------------------------------
def ensure_tools() -> dict:
    """docker (an engine answering), a compose, debootstrap: installed with apt-get and started when missing."""
    global DOCKER, COMPOSE
    missing = [pkg for pkg, exe in (("docker.io", "/usr/bin/docker"), ("docker-compose", "docker-compose"),
                                    ("debootstrap", "debootstrap")) if not shutil.which(exe)]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"compose-check: {', '.join(missing)} missing and not root: install them (apt-get)")
        log(f"apt-get install {' '.join(missing)}")
        sh("apt-get", "install", "-y", "-q", *missing, env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=900)
    # Debian's client (20.10) builds with BuildKit without a buildx plugin; a newer client elsewhere on PATH may not
    DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else shutil.which("docker")
    started = None
    if subprocess.run([DOCKER, "info"], capture_output=True).returncode:
        if os.geteuid() != 0:
            raise SystemExit("compose-check: no Docker engine answers and not root: start dockerd")
        log("starting dockerd")
        with open("/tmp/flm-dockerd.log", "a") as out:  # dockerd keeps its own copy of the descriptor
            started = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True).pid
        deadline = time.monotonic() + 60
        while subprocess.run([DOCKER, "info"], capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise CheckFailed("dockerd did not answer within 60 s (/tmp/flm-dockerd.log)")
            time.sleep(1)
    v2 = subprocess.run([DOCKER, "compose", "version"], capture_output=True).returncode == 0
    COMPOSE = [DOCKER, "compose"] if v2 else ["docker-compose"]
    return {"docker": docker("version", "--format", "{{.Server.Version}}").stdout.strip(),
            "compose": sh(*COMPOSE, "version").stdout.splitlines()[0], "dockerd_started_pid": started}


def registry_answers() -> bool:
    return subprocess.run([DOCKER, "pull", "-q", "python:3.11-slim"], capture_output=True, timeout=120).returncode == 0


def local_bases() -> None:
    """flm/debian-local (debootstrap + this host's CAs), then the python and postgres stand-ins on it."""
    if docker("images", "-q", DEBIAN).stdout.strip() == "":
        with tempfile.TemporaryDirectory() as tmp:
            rootfs = Path(tmp) / "rootfs"
            log("debootstrap bookworm (python3, venv, build tools, CA certificates)")
            sh("debootstrap", "--variant=minbase",
               "--include=python3,python3-venv,python3-dev,build-essential,curl,ca-certificates",
               "bookworm", str(rootfs), "http://deb.debian.org/debian", timeout=1800)
            for crt in Path("/usr/local/share/ca-certificates").glob("*.crt"):
                shutil.copy(crt, rootfs / "usr/local/share/ca-certificates" / crt.name)
            sh("chroot", str(rootfs), "update-ca-certificates")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
            docker("import", "-", DEBIAN, stdin=tar.stdout)
            tar.wait()
    for tag, dockerfile in ((LOCAL_PYTHON, "docker/local-python.Dockerfile"),
                            (LOCAL_POSTGRES, "docker/local-postgres.Dockerfile")):
        log(f"build {tag}")
        docker("build", "-q", "-f", dockerfile, "-t", tag, str(ROOT), env={"DOCKER_BUILDKIT": "1"})


def torch_wheel() -> None:
    """torch's CPU wheel into docker/wheels/, as this machine's pip configuration finds it."""
    out = ROOT / "docker" / "wheels"
    if not list(out.glob("torch-2.13.0*.whl")):
        sh(sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(out), TORCH, timeout=1800)


# --- the stack ------------------------------------------------------------------------------------------------------
def compose(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh(*COMPOSE, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), *args, env=ENV, **kw)


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise CheckFailed(f"{url} did not answer 200 within {timeout_s:.0f} s")
        time.sleep(2)


def containers(service: str) -> list[str]:
    return compose("ps", "-q", service).stdout.split()


def follow(http: httpx.Client, job_id: str, timeout_s: float, until=None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if (until and until(job)) or job["state"] in TERMINAL:
            return job
        time.sleep(0.5)
    raise CheckFailed(f"job {job_id} not done within {timeout_s:.0f} s: {job}")


def ray_nodes() -> int:
    out = compose("exec", "-T", "ray-head", "ray", "status").stdout
    active = out.split("Active:", 1)[1].split("Pending:", 1)[0]
    return sum(1 for line in active.splitlines() if "node_" in line)


def reachable(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(3)
        return s.connect_ex((host, port)) == 0


def run(args, result: dict) -> None:
    """The steps in order, each recording into `result` as it goes (a failed step leaves what came before)."""
    t, checks = result["timings_s"], result["checks"]
    t0 = time.monotonic()
    tools = result["tools"] = ensure_tools()
    registry = result["registry"] = registry_answers()
    log(f"docker {tools['docker']}, {tools['compose']}; container registry {'answers' if registry else 'unreachable'}")
    build_args = []
    if not registry:
        local_bases()
        torch_wheel()
        build_args = ["--build-arg", f"BASE_CPU={LOCAL_PYTHON}", "--build-arg", "TORCH_INDEX=none"]
        ENV["POSTGRES_IMAGE"] = LOCAL_POSTGRES
    t["bases_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    log(f"build {IMAGE}")
    docker("build", "-q", *build_args, "-t", IMAGE, str(ROOT), env={"DOCKER_BUILDKIT": "1"}, timeout=3600)
    t["build_s"] = time.monotonic() - t1

    t1 = time.monotonic()
    compose("up", "-d", "--no-build", "--scale", "worker=2", timeout=600)
    wait_http(f"{GATEWAY}/health", 300)
    t["up_s"] = time.monotonic() - t1
    deadline = time.monotonic() + 180  # the workers join after the gateway answers, at their own pace
    while (n := ray_nodes()) < 3 and time.monotonic() < deadline:
        time.sleep(3)
    checks["nodes_at_start"] = n
    key = compose("exec", "-T", "gateway", "flm", "keys", "create", "--name", "check", "--quiet").stdout.strip()
    http = httpx.Client(base_url=GATEWAY, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    # security: only the gateway's port is published; Ray's dashboard wants the token even inside the network
    checks["host_ports_closed"] = {p: not reachable("127.0.0.1", p) for p in (8265, 8000, 6379, 5432)}
    head_ip = docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                     containers("ray-head")[0]).stdout.strip()
    checks["dashboard_without_token_status"] = httpx.get(f"http://{head_ip}:8265/api/jobs/", timeout=10).status_code

    # the pipeline, with a worker container killed mid-stage
    t1 = time.monotonic()
    r = http.post("/v1/jobs", json=pipeline_request(eval_items=1, tp=2))
    if r.status_code != 201:
        raise CheckFailed(f"POST /v1/jobs: {r.status_code} {r.text}")
    job_id = result["job"] = r.json()["id"]
    total = r.json()["progress"]["total_steps"]
    kill_at = args.kill_at_step
    job = follow(http, job_id, 1800, until=lambda j: (j["progress"].get("step") or 0) >= kill_at)
    # the worker container running a Ray Train worker of the stage (the other may hold none)
    victim = next((c for c in containers("worker") if "RayTrainWorker" in docker("top", c, "-o", "pid,args").stdout),
                  containers("worker")[0])
    step_killed = job["progress"].get("step")
    docker("kill", victim)
    t_kill, unix_kill = time.monotonic(), time.time()
    log(f"killed worker container {victim[:12]} at step {step_killed} of {total}")
    job = follow(http, job_id, 2400)
    t["pipeline_s"] = time.monotonic() - t1
    checks["pipeline_state"] = job["state"]
    checks["worker_killed_at_step"] = step_killed
    checks["kill_to_success_s"] = time.monotonic() - t_kill
    if job["state"] != "SUCCEEDED":
        raise CheckFailed(f"the pipeline ended {job['state']}: {job.get('error')}")
    # the worker-group starts Ray Train made (cluster/train.py writes one line per start: stage, step, world size)
    attempts = [json.loads(line) for line in compose(
        "exec", "-T", "ray-head", "sh", "-c", "cat $(find /data -name attempts.jsonl)").stdout.splitlines() if line]
    checks["attempts"] = [{k: a.get(k) for k in ("stage", "step", "world_size", "time")} for a in attempts]
    starts: dict[int, list[int]] = {}
    for a in attempts:
        starts.setdefault(a["stage"], []).append(a["step"])
    # a restart of the killed stage from a checkpoint within it, not from the stage's start
    checks["resumed_from_checkpoint"] = any(max(v[1:], default=v[0]) > v[0] for v in starts.values())
    restart = next((a for a in attempts if a["time"] > unix_kill), None)
    checks["restart_after_kill"] = restart and {"stage": restart["stage"], "step": restart["step"],
                                                "seconds_after_kill": restart["time"] - unix_kill}

    # a completion through the gateway with the official client
    from openai import OpenAI

    t1 = time.monotonic()
    model = (job.get("results") or {}).get("deployment", {}).get("name", "tiny")
    out = OpenAI(base_url=f"{GATEWAY}/v1", api_key=key).completions.create(
        model=model, prompt=PROMPT, max_tokens=16, temperature=0.0)
    t["completion_s"] = time.monotonic() - t1
    checks["completion"] = out.choices[0].text

    # the gateway restarted: nothing lost
    t1 = time.monotonic()
    compose("restart", "gateway", timeout=300)
    wait_http(f"{GATEWAY}/health", 300)
    t["gateway_restart_s"] = time.monotonic() - t1
    after = http.get(f"/v1/jobs/{job_id}").json()
    checks["job_after_gateway_restart"] = after["state"]

    # a third worker joins
    t1 = time.monotonic()
    compose("up", "-d", "--no-build", "--scale", "worker=3", timeout=600)
    deadline = time.monotonic() + 180
    while (n := ray_nodes()) < 4 and time.monotonic() < deadline:
        time.sleep(3)
    t["scale_s"] = time.monotonic() - t1
    checks["nodes_after_scale"] = n


def verdict(result: dict) -> list[str]:
    c = result["checks"]
    failed = []
    if c.get("pipeline_state") != "SUCCEEDED":
        failed.append("pipeline did not succeed")
    if not c.get("resumed_from_checkpoint"):
        failed.append("no resume after the worker was killed")
    if not c.get("completion"):
        failed.append("empty completion")
    if c.get("job_after_gateway_restart") != "SUCCEEDED":
        failed.append("job lost over the gateway restart")
    if c.get("nodes_at_start") != 3 or c.get("nodes_after_scale") != 4:
        failed.append(f"Ray nodes {c.get('nodes_at_start')} -> {c.get('nodes_after_scale')}, expected 3 -> 4")
    if not all(c.get("host_ports_closed", {}).values()):
        failed.append(f"published ports: {c.get('host_ports_closed')}")
    if c.get("dashboard_without_token_status") not in (401, 403):
        failed.append(f"dashboard without token answered {c.get('dashboard_without_token_status')}")
    if c.get("left_running"):
        failed.append(f"left running after down: {c['left_running']}")
    return failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kill-at-step", type=int, default=101,
                    help="kill a worker once the job reports this step (tiny: stage 1 ends at 128 and checkpoints "
                         "every 100 steps; the job's progress lags the trainer by a few steps)")
    ap.add_argument("--keep", action="store_true", help="leave the stack up (for a look); `down` it yourself")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compose_check.json")
    args = ap.parse_args(argv)
    if args.kill_at_step < 1:
        ap.error("--kill-at-step: a step >= 1")
    ENV.update(RAY_AUTH_TOKEN=secrets.token_hex(32), POSTGRES_PASSWORD=secrets.token_hex(16))
    t0 = time.monotonic()
    result: dict = {"checks": {}, "timings_s": {}}
    error = None
    try:
        run(args, result)
    except (CheckFailed, subprocess.TimeoutExpired, httpx.HTTPError) as e:
        error = str(e)
    finally:
        if COMPOSE and not args.keep:
            t1 = time.monotonic()
            subprocess.run([*COMPOSE, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml"), "down", "-v"],
                           env={**os.environ, **ENV}, capture_output=True, timeout=300)
            result["timings_s"]["down_s"] = time.monotonic() - t1
            left = subprocess.run([DOCKER, "ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
                                  capture_output=True, text=True).stdout.split()
            result["checks"]["left_running"] = left
    result["timings_s"]["total_s"] = time.monotonic() - t0
    result["error"] = error
    result["failed"] = ([error] if error else []) + verdict(result)
    result["passed"] = not result["failed"]
    print("\n".join(f"{k:>20s} {v:8.1f} s" for k, v in result["timings_s"].items()))
    print(json.dumps({k: v for k, v in result.items() if k != "timings_s"}, indent=1, default=str))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
