"""`flm demo` (what `make demo` runs): the main job end to end on this machine, through the product's own front door.

1. the paper's cost plan (16B -> 51B -> 101B on 192 GPUs) vs training 101B from scratch;
2. `flm up`'s stack on free ports (a Ray head and the gateway, as background processes) under `--out`;
3. an API key, then the tiny `pipeline` job over REST: train configs/tiny.yaml with Ray Train (3 growth stages) ->
   the IQ suite on the final checkpoint -> deploy it on Ray Serve with TP = 2, followed with a progress bar;
4. a completion through the gateway's OpenAI route, a summary (stages, losses, growth |Δloss|, the growth speedup
   figure of the cost plan, IQ scores), written to `<out>/demo.json`;
5. the stack stopped by PID (also on Ctrl-C or failure).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from api.client import Client, console, follow
from api.settings import GatewaySettings
from api.stack import free_port, start_stack, stop_processes
from api.store import create_key, open_store
from flm.config import load_plan
from flm.plan import Hardware, plan_cost
from flm.train import read_metrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PROMPT = "ROMEO:"


def pipeline_request(eval_items: int, tp: int) -> dict:
    """The demo's job: the tiny preset trained, evaluated and deployed (no proxy search: it adds minutes)."""
    return {"kind": "pipeline", "plan": "tiny", "eval": {"subtasks": "offline", "n_items": eval_items},
            "deploy": {"name": "tiny", "tp": tp}}


def run_demo(out: str, eval_items: int = 5, tp: int = 2, num_cpus: int = 2) -> dict:
    c = console()
    home = Path(out).absolute()
    cost = plan_cost(load_plan(CONFIGS / "flm-101b.yaml"), Hardware(gpus=192, tflops_per_gpu=[162, 160, 165]))
    c.print(f"[bold]FLM-101B plan[/bold]: {cost.total_days:.2f} days by growth vs {cost.scratch_days:.2f} from "
            f"scratch on 192 GPUs: {cost.time_saving:.1%} saved ({cost.speedup:.2f}x)")

    os.environ["FLM_HOME"] = str(home)  # the gateway, the Ray head and the jobs all keep their files here
    t0 = time.monotonic()
    stack = start_stack(home, free_port(), free_port(), free_port(), free_port(), num_cpus)
    try:
        gateway = stack["processes"]["gateway"]["url"]
        c.print(f"[bold]stack up[/bold] in {time.monotonic() - t0:.0f} s: gateway {gateway}, "
                f"Ray dashboard {stack['processes']['ray']['dashboard']}")
        key, _ = create_key(open_store(GatewaySettings(home=home).db_url), "demo")
        client = Client(gateway, key, timeout=120)
        job = client.request("POST", "/v1/jobs", body=pipeline_request(eval_items, tp))
        c.print(f"[bold]submitted[/bold] {job['id']}: tiny plan -> Ray Train -> IQ suite -> Ray Serve (TP = {tp})")
        state = follow(client, job["id"])
        job = client.request("GET", f"/v1/jobs/{job['id']}")
        if state != "SUCCEEDED":
            raise RuntimeError(f"the pipeline ended {state}: {job.get('error')}; logs: flm logs {job['id']}")
        model = (job.get("results") or {}).get("deployment", {}).get("name", "tiny")
        completion = client.request("POST", "/v1/completions", body={
            "model": model, "prompt": PROMPT, "max_tokens": 32, "temperature": 0.0})
        summary = summarize(home, job, cost, completion)
        (home / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
        show(summary, home)
        return summary
    finally:
        stopped = stop_processes(stack["processes"])
        (home / "stack.json").unlink(missing_ok=True)
        c.print(f"stopped {', '.join(stopped)}")


def summarize(home: Path, job: dict, cost, completion: dict) -> dict:
    records = read_metrics(home / job["run_dir"]) if job.get("run_dir") else []
    evals = [r for r in records if "val_loss" in r]
    stages = {}
    for r in evals:
        stages[r["stage"]] = {"stage": r["stage"], "step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
    return {
        "job": job["id"],
        "seconds_per_step": {s["name"]: s.get("seconds") for s in job.get("steps") or []},
        "stages": list(stages.values()),
        "growth": [{"stage": r["stage"], "step": r["step"], "dloss": r["dloss"]}
                   for r in records if r.get("event") == "growth"],
        "paper_plan": {"growth_days": cost.total_days, "scratch_days": cost.scratch_days, "speedup": cost.speedup},
        "results": job.get("results"),
        "completion": {"prompt": PROMPT, "text": completion["choices"][0]["text"], "usage": completion.get("usage")},
        "plots": [str(p) for p in sorted(home.rglob("*.png"))],
    }


def show(summary: dict, home: Path) -> None:
    c = console()
    c.print("[bold]summary[/bold]")
    for s in summary["stages"]:
        c.print(f"  stage {s['stage']}: step {s['step']}, {s['tokens']:,} tokens, val loss {s['val_loss']:.3f}")
    for g in summary["growth"]:
        c.print(f"  growth into stage {g['stage']} at step {g['step']}: |Δloss| {g['dloss']:.1e}")
    p = summary["paper_plan"]
    c.print(f"  the paper's plan by growth: {p['growth_days']:.2f} days vs {p['scratch_days']:.2f} from scratch "
            f"({p['speedup']:.2f}x)")
    iq = (summary["results"] or {}).get("eval")
    if iq:
        c.print(f"  IQ suite: {json.dumps(iq)[:300]}", soft_wrap=True)
    c.print(f"  completion of {summary['completion']['prompt']!r}: {summary['completion']['text']!r}")
    for plot in summary["plots"]:
        c.print(f"  plot: {plot}")
    c.print(f"wrote {home / 'demo.json'}")
