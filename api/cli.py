"""The gateway's commands on `flm`: the local stack (`up`, `down`: api/stack.py), API keys, the end-to-end `demo`
(api/demo.py), and the REST client's commands (`submit`, `jobs`, `status`, `logs`, `cancel`, `resume`, `deploy`,
`generate`: api/client.py) that work against `FLM_URL` with `FLM_API_KEY`.

Wired into `flm` through the `flm.cli` entry point (`add_api_cli`); heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from api.client import Client, console, follow
from api.settings import GatewaySettings, Limits
from flm.config import FLMConfigError, flm_home


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
    job = Client().request("POST", "/v1/jobs", body=body)
    if args.json:
        print(json.dumps(job, indent=2))
    else:
        console().print(f"{job['id']}: {job['kind']} job {job['state']} (follow it: flm logs {job['id']} -f)")


def cmd_jobs(args) -> None:
    params = {k: v for k, v in dict(state=args.state, kind=args.kind, limit=args.limit).items() if v}
    page = Client().request("GET", "/v1/jobs", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return
    from rich.table import Table

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
    dep = client.request("POST", "/v1/deployments", body=body)
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
    out = client.request("POST", "/v1/completions", body=body)
    print(out["choices"][0]["text"])


# --- keys -------------------------------------------------------------------------------------------------------
def store():
    from api.settings import GatewaySettings
    from api.store import open_store

    return open_store(GatewaySettings().db_url)


LIMIT_OPTIONS = tuple(Limits.model_fields)  # each as Limits.option(name): --max-running-jobs ...


def limit_value(text: str) -> int | str | None:
    """A limit on the command line: a whole number, `unlimited` (no cap) or `default` (the gateway's)."""
    if text in ("unlimited", "default"):
        return None if text == "unlimited" else text
    try:
        return int(text)
    except ValueError:
        raise FLMConfigError(f"{text!r}: give a whole number, 'unlimited' or 'default'") from None


def key_limits(args) -> dict:
    return {name: limit_value(getattr(args, name)) for name in LIMIT_OPTIONS if getattr(args, name) is not None}


def show_limits(row) -> str:
    return ", ".join(f"{k}={'unlimited' if v is None else v}" for k, v in (row.limits or {}).items()) or \
        "the gateway's"


def cmd_keys_create(args) -> None:
    from api.store import create_key

    limits = key_limits(args)
    if "default" in limits.values():
        raise FLMConfigError("a new key has the gateway's limits already; give numbers or 'unlimited'")
    key, row = create_key(store(), args.name, args.owner, limits)
    if args.quiet:
        print(key)
        return
    console().print(f"key {row.id} for owner {row.owner!r}, limits: {show_limits(row)} (shown once, stored "
                    f"hashed):")
    print(key)


def cmd_keys_list(args) -> None:
    from rich.table import Table

    from api.store import list_keys

    table = Table(title="API keys")
    for col in ("id", "name", "owner", "prefix", "created", "revoked", "limits"):
        table.add_column(col)
    for k in list_keys(store()):
        table.add_row(str(k.id), k.name, k.owner, k.prefix + "...", str(k.created_at)[:19],
                      str(k.revoked_at)[:19] if k.revoked_at else "", show_limits(k))
    console().print(table)


def cmd_keys_revoke(args) -> None:
    from api.store import revoke_key

    row = revoke_key(store(), args.key)
    console().print(f"key {row.id} ({row.name}, owner {row.owner}) revoked")


def cmd_keys_limits(args) -> None:
    from api.store import set_key_limits

    limits = key_limits(args)
    if not limits:
        raise FLMConfigError(f"give at least one of {', '.join(Limits.option(n) for n in LIMIT_OPTIONS)}")
    row = set_key_limits(store(), args.key, limits)
    console().print(f"key {row.id} ({row.name}, owner {row.owner}) limits: {show_limits(row)} (the gateway's "
                    f"for the rest; in effect at its next request)")


def stack_lines(stack: dict) -> list[str]:
    """What `flm up` tells the user about the stack `api.stack.start_stack` started: where each part answers, where
    the jobs' curves are, how to stop it."""
    from api.stack import STACK_FILE

    gateway, ray, home = stack["processes"]["gateway"], stack["processes"]["ray"], Path(stack["home"])
    lines = [f"gateway  {gateway['url']}  (API docs: /docs)",
             f"console  {gateway['url']}/console/  (sign in with a key of `flm keys create`)",
             f"ray      {ray['address']}  dashboard {ray['dashboard']}",
             f"serve    {stack['serve_url']} (once a model is deployed)",
             f"curves   tensorboard --logdir {GatewaySettings(home=home).runs_dir}  (a job's run writes "
             f"<job id>/tensorboard)"]
    if ray.get("auth_token_path"):
        lines.append(f"Ray token auth: on, its token in {ray['auth_token_path']} (for the ray CLI: "
                     f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file>)")
    return lines + [f"PIDs in {home / STACK_FILE}, logs in {stack['logs']}; stop with `flm down`",
                    f"export FLM_URL={gateway['url']}  # and FLM_API_KEY from `flm keys create`"]


def cmd_up(args) -> None:
    from api.stack import start_stack

    stack = start_stack(flm_home(), args.port, args.ray_port, args.dashboard_port, args.serve_port, args.num_cpus)
    for line in stack_lines(stack):
        console().print(line)


def cmd_demo(args) -> None:
    from api.demo import run_demo

    run_demo(args.out, eval_items=args.eval_items, tp=args.tp)


def cmd_down(args) -> None:
    from api.stack import STACK_FILE, stop_processes

    path = flm_home() / STACK_FILE
    if not path.exists():
        raise FLMConfigError(f"no stack recorded in {path}; nothing to stop")
    stopped = stop_processes(json.loads(path.read_text())["processes"], args.grace)
    path.unlink()
    console().print(f"stopped {', '.join(stopped)}" if stopped else "the recorded processes had already exited")


# --- wiring -------------------------------------------------------------------------------------------------------
def add_limit_options(p) -> None:
    for name in LIMIT_OPTIONS:
        p.add_argument(Limits.option(name), metavar="N", dest=name,
                       help=f"the key's {name} (a number, 'unlimited', or 'default': the gateway's)")


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
    add_limit_options(k)
    k.set_defaults(func=cmd_keys_create)
    k = keys.add_parser("limits", help="set a key's own quotas (over the gateway's FLM_MAX_... settings)")
    k.add_argument("key", help="the key's id, name or value")
    add_limit_options(k)
    k.set_defaults(func=cmd_keys_limits)
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
    p.add_argument("source", help="checkpoint path (relative to $FLM_HOME, in owners/<you>/ or one of your jobs' "
                                  "runs/<id>/) or a job id")
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
