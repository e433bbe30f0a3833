"""The gateway's own cost: latency of `POST /v1/jobs` and throughput of `GET /v1/jobs/{id}`, with a concurrent HTTP
load generator (httpx, asyncio) on loopback against a real uvicorn gateway (`python -m api.server`, one process).

    .venv/bin/python benchmarks/gateway.py [--posts 300 --seconds 10 --concurrency 16 --ray-jobs 3]

What is measured:
- POST: a train job with the tiny plan inline (0.7 KB of JSON), created held (`hold: true`): validation of the plan
  by GrowthPlan, its files, the store row, the 201 answer. Submission to Ray is not in the request: the gateway
  answers first and its reconciler submits (so the figure does not depend on the cluster). At concurrency 1 and 8.
- Ray submission: with `--ray-jobs N > 0`, N more jobs are submitted for real to a local Ray head (started here,
  stopped after): the time from the POST to the job's PENDING state (the reconciler woke, `submit_job` returned,
  the state was stored); the jobs are then cancelled.
- GET: `--concurrency` clients loop on GET /v1/jobs/{id} of a job whose run directory holds a real run of the
  micro plan (metrics.jsonl, checkpoints), for `--seconds`; req/s and latency percentiles. The load generator is a
  keep-alive HTTP/1.1 client on asyncio streams (like wrk: about 0.1 ms of CPU per request, checked status and
  Content-Length); the same load from httpx.AsyncClient runs beside it for comparison: httpx spends about 3 ms of
  CPU per request, so on a 2-core machine it, not the gateway, sets the req/s.
The load generator shares the machine's cores with the server, so on a 2-core machine the req/s figure is a floor;
the gateway process's own CPU time per request is measured too (psutil), and 1000 / (its ms per GET) is what one
core would serve: the figure that does not depend on what else runs on the machine.

Prints JSON and writes benchmarks/results/gateway.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.settings import GatewaySettings  # noqa: E402
from api.stack import free_port, start_gateway, start_ray, stop_processes  # noqa: E402
from api.store import create_key, open_store  # noqa: E402


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def percentiles(ms: list[float]) -> dict:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50_ms": round(q[49], 2), "p90_ms": round(q[89], 2), "p99_ms": round(q[98], 2),
            "mean_ms": round(statistics.fmean(ms), 2), "max_ms": round(max(ms), 2)}


async def post_latencies(url: str, key: str, body: dict, n: int, concurrency: int) -> list[float]:
    out: list[float] = []
    queue = list(range(n))
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def worker():
            while queue:
                queue.pop()
                t0 = time.perf_counter()
                r = await client.post("/v1/jobs", json=body)
                out.append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 201, r.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def get_load(url: str, key: str, path: str, seconds: float, concurrency: int) -> tuple[int, float, list]:
    lat: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        await client.get(path)  # warm
        stop = time.perf_counter() + seconds

        async def worker():
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.get(path)
                lat.append((time.perf_counter() - t0) * 1e3)
                assert r.status_code == 200, r.text

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return len(lat), elapsed, lat


async def lean_get_load(url: str, key: str, path: str, seconds: float, concurrency: int) -> tuple[int, float, list]:
    """get_load's loop with a minimal HTTP/1.1 client: one keep-alive connection per worker, a fixed request, the
    response read by its Content-Length; anything but a 200 fails the run."""
    u = urlparse(url)
    request = (f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nAuthorization: Bearer {key}\r\n\r\n").encode()
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker():
        reader, writer = await asyncio.open_connection(u.hostname, u.port)
        try:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                writer.write(request)
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = dict(line.lower().split(": ", 1) for line in head[1:] if ": " in line)
                body = await reader.readexactly(int(fields["content-length"]))
                lat.append((time.perf_counter() - t0) * 1e3)
                assert head[0].split(" ")[1] == "200", (head[0], body[:200])
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(lat), time.perf_counter() - t0, lat


def micro_run(home: Path, url: str, key: str) -> str:
    """A held job of the micro plan whose run directory is filled by a real single-process run of that plan."""
    from flm.config import GrowthPlan
    from flm.data import TokenizerSpec, prepare_dataset
    from flm.train import Trainer
    from tests.conftest import micro_plan

    data = home / "owners" / "bench" / "micro"  # the key's owner's own directory: requests may name only its files
    prepare_dataset("shakespeare", data, TokenizerSpec(kind="bpe", vocab_size=320), seed=0, max_docs=6)
    plan = micro_plan("owners/bench/micro", "").model_dump(mode="json")
    r = httpx.post(f"{url}/v1/jobs", json={"kind": "train", "plan": plan, "hold": True},
                   headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    job = r.json()
    local = dict(job["spec"]["plan"])
    local["train"] = {**local["train"], "out": str(home / "runs" / job["id"])}
    Trainer(GrowthPlan.model_validate(local)).fit()
    return job["id"]


def ray_submissions(home: Path, n: int, body: dict, env: dict) -> dict:
    """POST -> PENDING (Ray accepted the submission) for n real jobs on a local Ray head; then cancel them."""
    ray_proc, ray = start_ray(home, free_port(), free_port(), num_cpus=2, env=env)
    gw_proc, gw = start_gateway(home, free_port(), ray["dashboard"], "http://127.0.0.1:8000", env=env)
    try:
        key, _ = create_key(open_store(GatewaySettings(home=home).db_url), "ray-bench")
        client = httpx.Client(base_url=gw["url"], headers={"Authorization": f"Bearer {key}"}, timeout=60)
        post_ms, pending_ms = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            job = client.post("/v1/jobs", json={**body, "hold": False}).json()
            post_ms.append((time.perf_counter() - t0) * 1e3)
            while (state := client.get(f"/v1/jobs/{job['id']}").json()["state"]) == "QUEUED":
                time.sleep(0.01)
            pending_ms.append((time.perf_counter() - t0) * 1e3)
            assert state in ("PENDING", "RUNNING"), state
            client.delete(f"/v1/jobs/{job['id']}")
        return {"post": {"ms": [round(x, 1) for x in post_ms]},
                "post_to_pending": {"ms": [round(x, 1) for x in pending_ms],
                                    "median_ms": round(statistics.median(pending_ms), 1)}}
    finally:
        stop_processes({"gateway": gw, "ray": ray})


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, lat in result["raw"]["post"].items():
        xs = sorted(lat)
        a.plot(xs, [100 * (i + 1) / len(xs) for i in range(len(xs))], label=f"POST /v1/jobs, concurrency {name}")
    for name, label in (("get", "lean client"), ("get_httpx", "httpx")):
        xs = sorted(result["raw"][name])
        a.plot(xs, [100 * (i + 1) / len(xs) for i in range(len(xs))],
               label=f"GET /v1/jobs/{{id}}, concurrency {result['get']['concurrency']} ({label})")
    a.axvline(50, color="gray", ls="--", lw=0.8)
    a.set_xscale("log")
    a.set_xlabel("latency (ms)")
    a.set_ylabel("% of requests")
    a.legend(fontsize=8)
    a.set_title("latency CDF (goal: POST p50 <= 50 ms)")
    b.bar(["measured,\nlean client", "measured,\nhttpx client", "one core of\ngateway CPU"],
          [result["get"]["req_per_s"], result["get_httpx"]["req_per_s"], result["get"]["one_core_req_per_s"]],
          color=["tab:green", "tab:gray", "tab:olive"])
    b.axhline(500, color="gray", ls="--", lw=0.8, label="goal 500 req/s")
    b.set_ylabel("requests / s")
    b.legend()
    b.set_title(f"GET /v1/jobs/{{id}}, {result['get']['concurrency']} clients, {result['get']['seconds']:.0f} s each "
                f"(server and clients share the machine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--ray-jobs", type=int, default=3, help="jobs submitted to a real Ray head (0: none)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gateway.png"))
    args = ap.parse_args()

    # one key posts hundreds of jobs a minute here: the gateway's request rate and running-jobs caps off
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "FLM_REQUESTS_PER_MINUTE": "unlimited", "FLM_MAX_RUNNING_JOBS": "unlimited"}
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    body = {"kind": "train", "plan": tiny, "hold": True}
    result: dict = {"machine": {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]},
                    "post_body_bytes": len(json.dumps(body))}
    with tempfile.TemporaryDirectory(prefix="flm-gateway-bench-") as tmp:
        home = Path(tmp)
        # no Ray behind this gateway: nothing it is given leaves the gateway (held jobs)
        proc, gw = start_gateway(home, free_port(), "http://127.0.0.1:9", "http://127.0.0.1:8000", env=env)
        try:
            key, _ = create_key(open_store(GatewaySettings(home=home).db_url), "bench")
            job_id = micro_run(home, gw["url"], key)
            server = psutil.Process(proc.pid)
            raw_post = {}
            for c in (1, 8):
                cpu = cpu_seconds(server)
                raw_post[c] = asyncio.run(post_latencies(gw["url"], key, body, args.posts, c))
                result[f"post_concurrency_{c}"] = {**percentiles(raw_post[c]), "server_cpu_ms_per_request": round(
                    (cpu_seconds(server) - cpu) * 1e3 / args.posts, 2)}
            view = httpx.get(f"{gw['url']}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
            me, lats = psutil.Process(), {}
            for name, load in (("get", lean_get_load), ("get_httpx", get_load)):
                cpu, own = cpu_seconds(server), cpu_seconds(me)
                n, elapsed, lats[name] = asyncio.run(load(gw["url"], key, f"/v1/jobs/{job_id}", args.seconds,
                                                          args.concurrency))
                get_cpu_ms = (cpu_seconds(server) - cpu) * 1e3 / n
                result[name] = {"concurrency": args.concurrency, "seconds": round(elapsed, 2),
                                "requests": n, "req_per_s": round(n / elapsed, 1), **percentiles(lats[name]),
                                "server_cpu_ms_per_request": round(get_cpu_ms, 3),
                                "one_core_req_per_s": round(1e3 / get_cpu_ms, 1),
                                "load_generator_cpu_ms_per_request": round((cpu_seconds(me) - own) * 1e3 / n, 3)}
            result["get"].update({"response_bytes": len(json.dumps(view)), "job": {
                "metrics_records": view["progress"]["step"], "checkpoints": len(view["checkpoints"])}})
            result["raw"] = {"post": raw_post, "get": lats["get"], "get_httpx": lats["get_httpx"]}
        finally:
            stop_processes({"gateway": gw})
        if args.ray_jobs:
            result["ray_submission"] = ray_submissions(home / "ray", args.ray_jobs, body, env)
    result["goals"] = {"post_p50_ms<=50": result["post_concurrency_1"]["p50_ms"] <= 50,
                       "get_req_per_s>=500": result["get"]["req_per_s"] >= 500,
                       "get_one_core_req_per_s>=500": result["get"]["one_core_req_per_s"] >= 500}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, out)
    raw = result.pop("raw")
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')} ({sum(len(v) for v in raw['post'].values())} POSTs)")


if __name__ == "__main__":
    main()
