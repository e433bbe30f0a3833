"""The local stack of `flm up` / `flm down`: a Ray head (`ray start --head --block`) and the gateway
(`python -m api.server`) as background processes, their PIDs recorded in `$FLM_HOME/stack.json`; stopping them
sends SIGTERM, then SIGKILL after a grace period, to exactly those processes and what they started. A blocking
`ray start` stops every Ray process it started when it is terminated, so nothing else on the machine is touched
(never `ray stop`, which kills every Ray on the host).

Ray's token auth is on: the token is generated once into `$FLM_HOME/stack/ray_auth_token` (mode 0600) and given to
Ray and the gateway as RAY_AUTH_TOKEN_PATH, so the dashboard's job API (remote code execution) and the GCS refuse
anyone without it, even on 127.0.0.1. An environment that sets RAY_AUTH_MODE itself keeps its choice (the tests'
`disabled`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flm.config import FLMConfigError

STACK_FILE = "stack.json"
TOKEN_FILE = "ray_auth_token"  # in $FLM_HOME/stack/


def ray_auth_env(home: Path, env: dict) -> dict:
    """RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH of the stack's token (made once, readable by its owner only);
    nothing if `env` chooses a RAY_AUTH_MODE itself."""
    if "RAY_AUTH_MODE" in env:
        return {}
    path = home / "stack" / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # 256 bits, as `ray get-auth-token --generate` makes them
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split(")")[-1].split()[0] == "Z")  # a zombie is gone


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, log: Path, ready=None) -> None:
    """Until `url` answers (and `ready()`, if given, is true); FLMConfigError if `proc` exits or time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "".join(log.read_text().splitlines(keepends=True)[-5:]) if log.exists() else ""
            raise FLMConfigError(f"{proc.args[0]} exited with code {proc.returncode} before {url} answered; "
                                 f"see {log}:\n{tail}")
        try:
            if httpx.get(url, timeout=2).status_code < 500 and (ready is None or ready()):
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise FLMConfigError(f"{url} did not answer within {timeout_s:.0f} s; see {log}")


def start_ray(home: Path, ray_port: int, dashboard_port: int, num_cpus: int | None, timeout_s: float = 180,
              env: dict | None = None, tries: int = 2) -> tuple[subprocess.Popen, dict]:
    """A Ray head (`ray start --head --block`) in the background, up once it says "Ray runtime started" and its
    dashboard answers. A head whose start times out (Ray gives its raylet 30 s, which a loaded machine can
    exceed) is started again, up to `tries` times.

    Its own `--temp-dir`: Ray's job supervisor connects a job's driver to the cluster named in
    `<temp dir>/ray_current_cluster` (the last `ray start` on the host, whichever), so with the shared /tmp/ray a
    job could land on another cluster of the same machine.

    No drain on SIGTERM (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 unless the caller sets it): Ray 2.60's head
    otherwise marks its node draining and waits up to 30 s for Serve to move its replicas elsewhere, which a
    one-node stack never can, so `flm down` took 30 s whenever a model was deployed (measured: 30.1 s with a TP = 2
    deployment, 4.8 s without). The gateway, Serve's only door, is stopped first, so there is no traffic to drain."""
    logs = home / "stack"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "ray.log"
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **(env or os.environ), "FLM_HOME": str(home),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(ray_auth_env(home, env))
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={ray_port}",
           f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--temp-dir=/tmp/flm-ray-{ray_port}", "--disable-usage-stats"]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    dashboard = f"http://127.0.0.1:{dashboard_port}"
    for attempt in range(1, tries + 1):
        start = log.stat().st_size if log.exists() else 0
        with open(log, "ab") as out:
            proc = subprocess.Popen([*cmd, f"--ray-client-server-port={free_port()}",
                                     f"--dashboard-agent-listen-port={free_port()}"],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_http(f"{dashboard}/api/version", proc, timeout_s, log,
                      ready=lambda start=start: b"Ray runtime started" in log.read_bytes()[start:])
            return proc, {"pid": proc.pid, "address": f"127.0.0.1:{ray_port}", "dashboard": dashboard,
                          "auth_token_path": env.get("RAY_AUTH_TOKEN_PATH")}
        except BaseException as e:
            exited = proc.poll() is not None  # Ray gave up starting: try again
            stop_processes({"ray": {"pid": proc.pid}})
            if not (isinstance(e, FLMConfigError) and exited) or attempt == tries:
                raise
    raise AssertionError("unreachable")


def start_gateway(home: Path, port: int, dashboard: str, serve_url: str, timeout_s: float = 120,
                  env: dict | None = None) -> tuple[subprocess.Popen, dict]:
    """The gateway (`python -m api.server`) in the background, answering on /health."""
    logs = home / "stack"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**(env or os.environ), "FLM_HOME": str(home), "FLM_RAY_ADDRESS": dashboard, "FLM_SERVE_URL": serve_url,
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(ray_auth_env(home, env))
    with open(logs / "gateway.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "api.server", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", proc, timeout_s, logs / "gateway.log")
    except BaseException:
        stop_processes({"gateway": {"pid": proc.pid}})
        raise
    return proc, {"pid": proc.pid, "url": url}


def start_stack(home: Path, port: int, ray_port: int, dashboard_port: int, serve_port: int,
                num_cpus: int | None) -> dict:
    """Start a Ray head and the gateway in the background; returns what `flm down` needs (also written to
    home/stack.json)."""
    home = home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    stack_path = home / STACK_FILE
    if stack_path.exists():
        old = json.loads(stack_path.read_text())
        running = [p["pid"] for p in old["processes"].values() if alive(p["pid"])]
        if running:
            raise FLMConfigError(f"the stack of {home} is already up (PIDs {running}); `flm down` first")
    for flag, p in (("--port", port), ("--ray-port", ray_port), ("--dashboard-port", dashboard_port)):
        if not port_free(p):
            raise FLMConfigError(f"{flag}: port {p} is taken; choose another")
        if flag != "--port" and 10002 <= p <= 19999:
            raise FLMConfigError(f"{flag}: port {p} is in the range Ray keeps for its workers (10002-19999)")
    serve_url = f"http://127.0.0.1:{serve_port}"
    _, ray = start_ray(home, ray_port, dashboard_port, num_cpus)
    stack = {"home": str(home), "processes": {"ray": ray}, "serve_url": serve_url, "logs": str(home / "stack")}
    stack_path.write_text(json.dumps(stack, indent=2))  # recorded at once: `flm down` works even if the rest fails
    try:
        _, stack["processes"]["gateway"] = start_gateway(home, port, ray["dashboard"], serve_url)
    except BaseException:
        stop_processes(stack["processes"])
        stack_path.unlink(missing_ok=True)
        raise
    stack_path.write_text(json.dumps(stack, indent=2))
    return stack


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (with the PID, it names one process), None if gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every process below `pid` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if (t := start_time(child)) is not None:
                found[child] = t
                todo.append(child)
    return found


def stop_processes(procs: dict, grace_s: float = 30.0) -> list[str]:
    """SIGTERM each recorded process that is still the one we started (its command line says so), the gateway
    first, so it does not see Ray vanish under running jobs. A blocking `ray start` stops the processes it started
    itself; whatever of that process tree (noted before the SIGTERM) is still there after `grace_s` (a loaded
    machine can take that long) is SIGKILLed, each only if it is still the same process (PID and start time).

    One line per process stopped, e.g. "ray (PID 7)"; a tree that needed SIGKILL says which of its processes did
    not exit in time and what they were ("ray (PID 7; SIGKILLed after 30 s: 12 python3 -m ...)"), so a slow
    `flm down` names its cause."""
    marks = {"gateway": "api.server", "ray": "ray start"}
    stopped = []
    for name in ("gateway", "ray"):
        info = procs.get(name)
        if not info or not alive(info["pid"]) or marks[name] not in cmdline(info["pid"]):
            continue
        pid = info["pid"]
        tree = {pid: start_time(pid), **descendants(pid)}
        names = {p: cmdline(p).strip()[:100] for p in tree}  # read now: a killed process has none
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) and start_time(p) == t for p, t in tree.items()):
            _reap(pid)
            time.sleep(0.2)
        killed = []
        for p, t in tree.items():
            if alive(p) and start_time(p) == t:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
                    killed.append(f"{p} {names[p]}")
        _reap(pid)
        stopped.append(f"{name} (PID {pid}; SIGKILLed after {grace_s:.0f} s: {', '.join(killed)})" if killed
                       else f"{name} (PID {pid})")
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child when an earlier `flm up` started it
        os.waitpid(pid, os.WNOHANG)
