"""The gateway's commands on `flm`: the local stack (`up`, `down`), API keys, and a client of the REST API (`submit`,
`jobs`, `status`, `logs`, `cancel`, `resume`, `deploy`, `generate`) that works against `FLM_URL` with
`FLM_API_KEY`.

`flm up` starts two background processes, a Ray head (`ray start --head --block`) and the gateway
(`python -m api.server`), and records their PIDs in `$FLM_HOME/stack.json`; `flm down` stops exactly those two
(SIGTERM, then SIGKILL after a grace period). A blocking `ray start` stops every Ray process it started when it
is terminated, so nothing else on the machine is touched (never `ray stop`, which kills every Ray on the host).

Wired into `flm` through the `flm.cli` entry point (`add_api_cli`); heavy imports happen inside the commands.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from flm.config import FLMConfigError

STACK_FILE = "stack.json"


def console():
    from flm.cli import console

    return console


# --- the REST client --------------------------------------------------------------------------------------------
class Client:
    """httpx against FLM_URL with FLM_API_KEY; every non-2xx answer becomes a one-line FLMConfigError."""

    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60.0):
        import httpx

        from api.settings import DEFAULT_PORT

        self.url = (url or os.environ.get("FLM_URL") or f"http://127.0.0.1:{DEFAULT_PORT}").rstrip("/")
        key = key if key is not None else os.environ.get("FLM_API_KEY")
        if not key:
            raise FLMConfigError("FLM_API_KEY: not set; create a key with `flm keys create --name NAME` on the "
                                 "gateway's machine and export it")
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def request(self, method: str, path: str, **kwargs) -> dict:
        import httpx

        try:
            r = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise FLMConfigError(f"FLM_URL: nothing answers at {self.url} ({type(e).__name__}); start the stack "
                                 f"with `flm up` or set FLM_URL") from None
        if r.status_code >= 400:
            try:
                message = r.json().get("error") or r.text
            except ValueError:
                message = r.text.strip() or r.reason_phrase
            raise FLMConfigError(f"{r.status_code} from {method} {path}: {message}")
        return r.json()

    def stream_events(self, path: str):
        """(event, data) pairs of a server-sent event stream."""
        import httpx

        try:
            with self.http.stream("GET", path, headers={"Accept": "text/event-stream"}, timeout=None) as r:
                if r.status_code >= 400:
                    r.read()
                    raise FLMConfigError(f"{r.status_code} from GET {path}: {r.json().get('error', r.text)}")
                event, data = "message", []
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        yield event, json.loads("\n".join(data))
                        event, data = "message", []
        except httpx.TransportError as e:
            raise FLMConfigError(f"FLM_URL: the stream from {self.url} broke ({type(e).__name__})") from None


def load_request(path: str) -> dict:
    """A job request from YAML or JSON; a bare growth plan (it has `stages`) is a train job."""
    from flm.config import load_yaml

    data = load_yaml(path)
    if "kind" not in data and "stages" in data:
        data = {"kind": "train", "plan": data}
    return data


# --- jobs ---------------------------------------------------------------------------------------------------------
def cmd_submit(args) -> None:
    body = load_request(args.file)
    if args.hold:
        body["hold"] = True
    job = Client().request("POST", "/v1/jobs", json=body)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        console().print(f"{job['id']}: {job['kind']} job {job['state']} (follow it: flm logs {job['id']} -f)")


def cmd_jobs(args) -> None:
    from rich.table import Table

    params = {k: v for k, v in dict(state=args.state, kind=args.kind, limit=args.limit).items() if v}
    page = Client().request("GET", "/v1/jobs", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return
    table = Table(title=f"{page['total']} jobs")
    for col in ("id", "kind", "state", "stage", "progress", "loss", "created", "error"):
        table.add_column(col)
    for j in page["jobs"]:
        p, m = j.get("progress"), j.get("metrics") or {}
        table.add_row(j["id"], j["kind"], j["state"], "" if j.get("stage") is None else f"{j['stage']}/{j['stages']}",
                      f"{p['percent']:.0f}%" if p and p.get("percent") is not None else "",
                      f"{m['loss']:.3f}" if "loss" in m else "", j["created_at"][:19], (j.get("error") or "")[:60])
    console().print(table)


def cmd_status(args) -> None:
    job = Client().request("GET", f"/v1/jobs/{args.id}")
    if args.json:
        print(json.dumps(job, indent=2))
        return
    c = console()
    c.print(f"[bold]{job['id']}[/bold] {job['kind']} {job['state']} (attempt {job['attempt']})")
    if job.get("progress"):
        p = job["progress"]
        c.print(f"  stage {job.get('stage')} of {job['stages']}, step {p['step']}/{p['total_steps']}, "
                f"{p['tokens']:,}/{p['total_tokens']:,} tokens ({p['percent']:.1f}%)")
    if job.get("metrics"):
        m = job["metrics"]
        c.print(f"  loss {m['loss']:.4f}" + (f", val loss {job['val_loss']:.4f}" if job.get("val_loss") else ""))
    for step in job.get("steps") or []:
        c.print(f"  {step['name']}: {step['state']}" + (f" {step['result']}" if step.get("result") else ""))
    if job.get("checkpoints"):
        c.print(f"  newest checkpoint: {job['checkpoints'][-1]}")
    if job.get("error"):
        c.print(f"  [red]error[/red]: {job['error']}")


def follow(client: Client, job_id: str) -> str:
    """A live progress bar from the job's metric stream until it ends; returns the final state."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    c = console()
    final = "UNKNOWN"
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn())
    steps: dict[str, str] = {}
    with Progress(*columns, console=c) as bar:
        task = bar.add_task(f"{job_id} queued", total=None)
        for event, data in client.stream_events(f"/v1/jobs/{job_id}/metrics?stream=true"):
            if event == "state":
                p = data.get("progress") or {}
                bar.update(task, total=p.get("total_tokens"), description=f"{job_id} {data['state'].lower()}")
                for step in data.get("steps") or []:  # a pipeline's steps, as they change
                    if steps.get(step["name"]) != step["state"]:
                        steps[step["name"]] = step["state"]
                        if step["state"] not in ("PENDING", "SKIPPED"):
                            result = f" {step['result']}" if step.get("result") else ""
                            c.print(f"{step['name']}: {step['state'].lower()}{result}", soft_wrap=True)
                    if step["state"] == "RUNNING":
                        bar.update(task, description=f"{job_id} {step['name']}")
            elif event == "metric":
                if data.get("event") == "growth":
                    c.print(f"grew into stage {data['stage']} at step {data['step']}: "
                            f"{data['params'] / 1e6:.2f}M params, |Δloss| {data['dloss']:.1e}")
                elif "loss" in data:
                    val = f" val {data['val_loss']:.3f}" if "val_loss" in data else ""
                    bar.update(task, completed=data["tokens"],
                               description=f"stage {data['stage']} loss {data['loss']:.3f}{val}")
            elif event == "end":
                final = data["state"]
                if data.get("error"):
                    c.print(f"[red]{job_id} {final}[/red]: {data['error']}")
    return final


def cmd_logs(args) -> None:
    client = Client()
    if args.follow:
        state = follow(client, args.id)
        console().print(f"{args.id}: {state}")
        if state != "SUCCEEDED":
            sys.exit(1)
        return
    params = {"tail": args.tail} if args.tail else {}
    print(client.request("GET", f"/v1/jobs/{args.id}/logs", params=params)["logs"], end="")


def cmd_cancel(args) -> None:
    job = Client().request("DELETE", f"/v1/jobs/{args.id}")
    console().print(f"{job['id']}: {job['state']}")


def cmd_resume(args) -> None:
    job = Client().request("POST", f"/v1/jobs/{args.id}/resume")
    console().print(f"{job['id']}: {job['state']} (attempt {job['attempt'] + 1} starts now)")


# --- deployments and models -----------------------------------------------------------------------------------
def cmd_deploy(args) -> None:
    body: dict = {"tp": args.tp, "replicas": args.replicas}
    source = args.source
    body["job_id" if source.startswith("job-") else "checkpoint"] = source
    if args.name:
        body["name"] = args.name
    if args.max_replicas:
        body["autoscaling"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
    client = Client()
    dep = client.request("POST", "/v1/deployments", json=body)
    deadline = time.monotonic() + args.timeout
    with console().status(f"{dep['id']}: deploying (TP {args.tp}) ..."):
        while dep["state"] == "DEPLOYING" and not args.no_wait and time.monotonic() < deadline:
            time.sleep(1)
            dep = client.request("GET", f"/v1/deployments/{dep['id']}")
    if dep["state"] == "FAILED":
        raise FLMConfigError(f"deployment {dep['id']} FAILED: {dep['error']}")
    if dep["state"] == "DEPLOYING" and not args.no_wait:
        raise FLMConfigError(f"--timeout: {dep['id']} is still DEPLOYING after {args.timeout:.0f} s; see "
                             f"`flm status` of the deployment with GET /v1/deployments/{dep['id']}")
    where = f" at {dep['url']}" if dep.get("url") else ""
    console().print(f"{dep['id']}: {dep['state']}{where} (query it: flm generate 'text' --model {dep['id']})")


def cmd_undeploy(args) -> None:
    dep = Client().request("DELETE", f"/v1/deployments/{args.name}")
    console().print(f"{dep['id']}: {dep['state']}")


def cmd_generate(args) -> None:
    client = Client(timeout=args.timeout)
    model = args.model
    if not model:
        models = client.request("GET", "/v1/models")["data"]
        if not models:
            raise FLMConfigError("--model: nothing is deployed; flm deploy CHECKPOINT first")
        model = models[0]["id"]
    body = {"model": model, "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    out = client.request("POST", "/v1/completions", json=body)
    print(out["choices"][0]["text"])


# --- keys -------------------------------------------------------------------------------------------------------
def store():
    from api.settings import GatewaySettings
    from api.store import open_store

    return open_store(GatewaySettings().db_url)


def cmd_keys_create(args) -> None:
    from api.store import create_key

    key, row = create_key(store(), args.name, args.owner)
    if args.quiet:
        print(key)
        return
    console().print(f"key {row.id} for owner {row.owner!r} (shown once, stored hashed):")
    print(key)


def cmd_keys_list(args) -> None:
    from rich.table import Table

    from api.store import list_keys

    table = Table(title="API keys")
    for col in ("id", "name", "owner", "prefix", "created", "revoked"):
        table.add_column(col)
    for k in list_keys(store()):
        table.add_row(str(k.id), k.name, k.owner, k.prefix + "...", str(k.created_at)[:19],
                      str(k.revoked_at)[:19] if k.revoked_at else "")
    console().print(table)


def cmd_keys_revoke(args) -> None:
    from api.store import revoke_key

    row = revoke_key(store(), args.key)
    console().print(f"key {row.id} ({row.name}, owner {row.owner}) revoked")


# --- the local stack ------------------------------------------------------------------------------------------
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
    job could land on another cluster of the same machine."""
    logs = home / "stack"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "ray.log"
    env = {**(env or os.environ), "FLM_HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0"}
    env.setdefault("RAY_AUTH_MODE", "disabled")  # the dashboard listens on 127.0.0.1; the gateway has the keys
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
            return proc, {"pid": proc.pid, "address": f"127.0.0.1:{ray_port}", "dashboard": dashboard}
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
    env.setdefault("RAY_AUTH_MODE", "disabled")
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
    machine can take that long) is SIGKILLed, each only if it is still the same process (PID and start time)."""
    marks = {"gateway": "api.server", "ray": "ray start"}
    stopped = []
    for name in ("gateway", "ray"):
        info = procs.get(name)
        if not info or not alive(info["pid"]) or marks[name] not in cmdline(info["pid"]):
            continue
        pid = info["pid"]
        tree = {pid: start_time(pid), **descendants(pid)}
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) and start_time(p) == t for p, t in tree.items()):
            _reap(pid)
            time.sleep(0.2)
        for p, t in tree.items():
            if alive(p) and start_time(p) == t:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
        _reap(pid)
        stopped.append(f"{name} (PID {pid})")
    return stopped


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child when an earlier `flm up` started it
        os.waitpid(pid, os.WNOHANG)


def cmd_up(args) -> None:
    from api.settings import flm_home

    stack = start_stack(flm_home(), args.port, args.ray_port, args.dashboard_port, args.serve_port, args.num_cpus)
    c = console()
    c.print(f"gateway  {stack['processes']['gateway']['url']}  (API docs: /docs)")
    c.print(f"ray      {stack['processes']['ray']['address']}  dashboard {stack['processes']['ray']['dashboard']}")
    c.print(f"serve    {stack['serve_url']} (once a model is deployed)")
    c.print(f"PIDs in {Path(stack['home']) / STACK_FILE}, logs in {stack['logs']}; stop with `flm down`")
    c.print(f"export FLM_URL={stack['processes']['gateway']['url']}  # and FLM_API_KEY from `flm keys create`")


def cmd_demo(args) -> None:
    from api.demo import run_demo

    run_demo(args.out, eval_items=args.eval_items, tp=args.tp)


def cmd_down(args) -> None:
    from api.settings import flm_home

    path = flm_home() / STACK_FILE
    if not path.exists():
        raise FLMConfigError(f"no stack recorded in {path}; nothing to stop")
    stopped = stop_processes(json.loads(path.read_text())["processes"], args.grace)
    path.unlink()
    console().print(f"stopped {', '.join(stopped)}" if stopped else "the recorded processes had already exited")


# --- wiring -------------------------------------------------------------------------------------------------------
def add_api_cli(sub) -> None:
    """Register the gateway's commands on the `flm` command's subparsers."""
    from api.settings import DEFAULT_PORT

    p = sub.add_parser("up", help="start a local Ray head and the gateway in the background")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"gateway port (default {DEFAULT_PORT})")
    p.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default 6379)")
    p.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard / job server port (8265)")
    p.add_argument("--serve-port", type=int, default=8000, help="Ray Serve HTTP port for deployments (8000)")
    p.add_argument("--num-cpus", type=int, help="CPUs Ray may use (default: all)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("demo", help="the main job end to end: stack up, tiny pipeline over REST, TP=2 deploy, "
                                    "a completion, stack down")
    p.add_argument("--out", default="runs/demo", help="the demo's storage root ($FLM_HOME of its stack)")
    p.add_argument("--eval-items", type=int, default=5, help="IQ items per subtask")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of the deployment")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("down", help="stop the Ray head and gateway that `flm up` started (by PID)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("keys", help="API keys of the gateway (run on its machine: writes the store directly)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", help="create a key and print it once")
    k.add_argument("--name", required=True)
    k.add_argument("--owner", help="whose jobs the key sees (default: the name)")
    k.add_argument("-q", "--quiet", action="store_true", help="print only the key")
    k.set_defaults(func=cmd_keys_create)
    k = keys.add_parser("list", help="keys, without their values")
    k.set_defaults(func=cmd_keys_list)
    k = keys.add_parser("revoke", help="revoke a key by id, name or value")
    k.add_argument("key")
    k.set_defaults(func=cmd_keys_revoke)

    p = sub.add_parser("submit", help="submit a job (YAML/JSON request, or a bare growth plan) to the gateway")
    p.add_argument("file")
    p.add_argument("--hold", action="store_true", help="create it held; start with `flm resume ID`")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list your jobs")
    p.add_argument("--state")
    p.add_argument("--kind")
    p.add_argument("--limit", type=int)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("status", help="a job's state, stage, progress, metrics and checkpoints")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("logs", help="a job's logs; -f: follow it with a progress bar until it ends")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--tail", type=int)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a job (stops its Ray job and workers)")
    p.add_argument("id")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("resume", help="start a held job, or continue a stopped or failed one from its checkpoint")
    p.add_argument("id")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("deploy", help="serve a checkpoint (a path in the storage root) or a job's final one")
    p.add_argument("source", help="checkpoint path (relative to $FLM_HOME) or a job id")
    p.add_argument("--name", help="model name (default: the job id, or generated)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, help="autoscale between --replicas and this")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the deployment to run")
    p.add_argument("--no-wait", action="store_true", help="return at once (state DEPLOYING)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("undeploy", help="delete a deployment")
    p.add_argument("name")
    p.set_defaults(func=cmd_undeploy)

    p = sub.add_parser("generate", help="a completion from a deployed model, through the gateway")
    p.add_argument("prompt")
    p.add_argument("--model", help="deployment name (default: the first deployed)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=120)
    p.set_defaults(func=cmd_generate)
