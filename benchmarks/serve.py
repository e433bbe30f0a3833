"""Serving speed of the grown tiny model: configs/tiny.yaml (2x128 -> 4x128 -> 4x256) with RoPE positions so that
`flm export-hf` can hand the same weights to `transformers`; trained here (a few minutes) if its run is missing.

  (a) single request: decode tokens/s of our engine (in-process, tp = 1: ModelShard + Engine) against
      `transformers` `generate` (greedy, KV cache) on the exported GPTNeoXForCausalLM weights: same prompt, same N
      new tokens (both forced to N: the end-of-text token does not stop either), same process and torch threads,
      median of `--repeats` runs after a warm-up; the two token sequences are compared as a check;
  (b) continuous batching: aggregate tokens/s of C concurrent clients (each sends requests back to back) against
      one client, through the same engine; the two settings alternate for --rounds rounds (medians);
  (c) time to first token (submit -> first token), p50 / p99 over every request of each setting in (b).
  In-process runs also report tokens per CPU-second of this process (`time.process_time`; every model runs on one
  thread here): on a shared machine wall-clock rates swing with the other jobs' load, CPU time much less.
  --http adds (b) and (c) through the whole stack: `service.app.deploy` on a local Ray cluster (tp = --tp shard
  actors, Ray Serve's HTTP proxy), clients streaming over HTTP (`stream: true`; tokens from `usage`).

    .venv/bin/python benchmarks/serve.py                # full: the tiny model, engine + --http
    .venv/bin/python benchmarks/serve.py --quick        # CI smoke test: an untrained 2-layer model, seconds
    .venv/bin/python benchmarks/serve.py --replot benchmarks/results/serve.json

Writes benchmarks/results/serve.{json,png} (`--out`) and prints the JSON. The machine may be shared: the JSON
records the load average before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flm.checkpoint import list_checkpoints, save_checkpoint  # noqa: E402
from flm.config import GrowthPlan, ModelConfig, load_plan, parse  # noqa: E402
from flm.data import Tokenizer  # noqa: E402
from flm.generate import SamplingParams  # noqa: E402
from flm.model import GPT  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?"
CLIENT_PROMPTS = ["To be, or not to be", "Now is the winter of our discontent", "Friends, Romans, countrymen",
                  "O Romeo, Romeo", "All the world's a stage", "If music be the food of love", "Once more unto the",
                  "Is this a dagger which I see"]


# --- the model ---------------------------------------------------------------------------------------------------
def tiny_rope_checkpoint(workdir: Path) -> Path:
    """The last checkpoint of configs/tiny.yaml trained with RoPE (resumes or skips a finished run)."""
    from flm.train import Trainer

    plan = load_plan(ROOT / "configs" / "tiny.yaml").model_dump()
    plan["name"] = "tiny-rope"
    plan["stages"][0]["model"]["pos"] = "rope"
    plan["train"]["out"] = str(workdir / "tiny-rope")
    plan = parse(GrowthPlan, plan, "tiny-rope")
    last = list_checkpoints(workdir / "tiny-rope")
    if not last or json.loads((last[-1] / "trainer_state.json").read_text())["step"] < plan.stage_starts()[-1]:
        print(f"training {plan.name} into {workdir / 'tiny-rope'} (a few minutes)", file=sys.stderr)
        Trainer(plan).fit()
        last = list_checkpoints(workdir / "tiny-rope")
    return last[-1]


def untrained_checkpoint(workdir: Path) -> Path:
    """--quick: a 2-layer RoPE model at its random init and a BPE trained on two lines (speed, not quality)."""
    tok_dir, out = workdir / "tokenizer", workdir / "quick"
    tok = Tokenizer.train([PROMPT, *CLIENT_PROMPTS] * 4, vocab_size=300)
    tok.save(tok_dir)
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=2, vocab_size=tok.vocab_size, seq_len=64, pos="rope",
                      base_width=64)
    return save_checkpoint(out, cfg, GPT(cfg, generator=torch.Generator().manual_seed(0)).state_dict(),
                           tokenizer_dir=tok_dir)


class NeverEnds:
    """The checkpoint's tokenizer, without an end-of-text token: every request decodes exactly max_tokens."""

    eot_id = -1

    def __init__(self, tok: Tokenizer):
        self.encode, self.decode = tok.encode, tok.decode


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- (a) one request -----------------------------------------------------------------------------------------------
def single_request(ck: Path, tok: Tokenizer, new_tokens: int, repeats: int, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from flm.export import export_hf
    from service.engine import Engine
    from service.tp import ModelShard

    ids = tok.encode(PROMPT)
    shard = ModelShard(str(ck), max_batch=1)
    engine = Engine(shard, NeverEnds(tok), shard.cfg.seq_len)
    params = SamplingParams(max_tokens=new_tokens)

    def ours() -> tuple[float, float, str]:
        async def one():
            t, c, text = time.perf_counter(), time.process_time(), ""
            async for d in engine.submit(ids, params):
                text += d.text
            return time.perf_counter() - t, time.process_time() - c, text

        return asyncio.run(one())

    hf_dir = export_hf(ck, workdir / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def theirs() -> tuple[float, float, str]:
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, use_cache=True)
        return time.perf_counter() - t, time.process_time() - c, tok.decode(out[0, len(ids):].tolist())

    runs = {"engine": {"seconds": [], "cpu_seconds": []}, "transformers": {"seconds": [], "cpu_seconds": []}}
    try:
        same = ours()[2] == theirs()[2]  # also the warm-up
        for _ in range(repeats):  # alternated: a shared machine's load drifts
            for name, fn in (("engine", ours), ("transformers", theirs)):
                wall, cpu, _ = fn()
                runs[name]["seconds"].append(wall)
                runs[name]["cpu_seconds"].append(cpu)
    finally:
        engine.close()
    for r in runs.values():
        r["tokens_per_s"] = new_tokens / statistics.median(r["seconds"])
        r["tokens_per_cpu_s"] = new_tokens / statistics.median(r["cpu_seconds"])
    return {"prompt_tokens": len(ids), "new_tokens": new_tokens, "repeats": repeats, **runs,
            "speedup": runs["engine"]["tokens_per_s"] / runs["transformers"]["tokens_per_s"],
            "speedup_cpu": runs["engine"]["tokens_per_cpu_s"] / runs["transformers"]["tokens_per_cpu_s"],
            "same_greedy_text": same}


# --- (b), (c) concurrent clients -------------------------------------------------------------------------------------
async def clients(send, n_clients: int, per_client: int) -> dict:
    """`n_clients` clients, each sending `per_client` requests back to back; send(prompt) -> (ttft_s, tokens).
    TTFT values are kept (`ttft_s`) so that rounds can be pooled."""
    async def client(c: int):
        out = []
        for r in range(per_client):
            out.append(await send(CLIENT_PROMPTS[(c + r) % len(CLIENT_PROMPTS)]))
        return out

    t, cpu = time.perf_counter(), time.process_time()
    results = [x for rs in await asyncio.gather(*(client(c) for c in range(n_clients))) for x in rs]
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    ttft = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {"clients": n_clients, "requests": len(results), "tokens": tokens, "seconds": wall, "cpu_seconds": cpu,
            "ttft_s": ttft}


def alternate(run, n_clients: int, rounds: int) -> dict:
    """run(c) -> clients(...) alternated between 1 and n_clients clients for `rounds` rounds (the load of a shared
    machine drifts); tokens/s is the median over rounds, TTFT percentiles pool every request of a setting."""
    runs = {1: [], n_clients: []}
    for _ in range(rounds):
        for c in runs:
            runs[c].append(run(c))
    out = {}
    for key, c in (("one", 1), ("many", n_clients)):
        ttft = [t for r in runs[c] for t in r.pop("ttft_s")]
        out[key] = {"clients": c, "requests": runs[c][0]["requests"], "tokens": runs[c][0]["tokens"],
                    "rounds": runs[c], "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in runs[c]),
                    "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}
        out[key]["tokens_per_cpu_s"] = statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs[c])
    out["speedup"] = out["many"]["tokens_per_s"] / out["one"]["tokens_per_s"]
    out["speedup_cpu"] = out["many"]["tokens_per_cpu_s"] / out["one"]["tokens_per_cpu_s"]
    return out


def batching(ck: Path, tok: Tokenizer, new_tokens: int, n_clients: int, per_client: int, rounds: int) -> dict:
    from service.engine import Engine, EngineConfig
    from service.tp import ModelShard

    shard = ModelShard(str(ck), max_batch=n_clients)
    engine = Engine(shard, NeverEnds(tok), shard.cfg.seq_len, EngineConfig(max_batch=n_clients))
    params = SamplingParams(max_tokens=new_tokens)

    async def send(prompt: str) -> tuple[float, int]:
        t, first, n = time.perf_counter(), None, 0
        async for d in engine.submit(tok.encode(prompt), params):
            first = first or time.perf_counter() - t
            n += d.tokens
        return first, n

    try:
        asyncio.run(clients(send, 1, 1))  # warm-up
        result = alternate(lambda c: asyncio.run(clients(send, c, per_client)), n_clients, rounds)
        result["peak_batch"] = engine.load()["peak_batch"]
    finally:
        engine.close()
    return result


def batching_http(ck: Path, new_tokens: int, n_clients: int, per_client: int, rounds: int, tp: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from service.app import DeploymentRequest, deploy

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        request = DeploymentRequest(checkpoint=str(ck), name="bench", tp=tp, max_batch=n_clients,
                                    cpus_per_shard=round(1.6 / tp, 2), replica_cpus=0.2)
        url = deploy(request, port=port) + "/v1/completions"

        async def run(c: int) -> dict:
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
                async def send(prompt: str) -> tuple[float, int]:
                    body = {"model": "bench", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                            "stream": True, "stream_options": {"include_usage": True}}
                    t, first, n = time.perf_counter(), None, 0
                    async with http.stream("POST", url, json=body) as r:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            first = first or time.perf_counter() - t
                            event = json.loads(line[6:])
                            if event.get("usage"):
                                n = event["usage"]["completion_tokens"]
                    return first, n

                return await clients(send, c, per_client)

        asyncio.run(run(1))  # warm-up: the first request through a fresh proxy and replica
        result = alternate(lambda c: asyncio.run(run(c)), n_clients, rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
    for key in ("one", "many"):  # the CPU time of this process is the clients', not the server's
        result[key].pop("tokens_per_cpu_s")
        for r in result[key]["rounds"]:
            r.pop("cpu_seconds")
    result.pop("speedup_cpu")
    return {"tp": tp, **result}


# --- report --------------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    a = result["single_request"]
    ax = axes[0]
    bars = ax.bar(["our engine", "transformers\ngenerate"], [a["engine"]["tokens_per_s"],
                                                             a["transformers"]["tokens_per_s"]],
                  color=["#2a7f62", "#777777"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_title(f"(a) one request, {a['new_tokens']} new tokens: {a['speedup']:.2f}x\n"
                 f"(per CPU-second: {a['speedup_cpu']:.2f}x)")
    ax.set_ylabel("decode tokens / s")
    modes = [("engine", result["batching"])] + ([(f"HTTP, tp={result['http']['tp']}", result["http"])]
                                                 if result.get("http") else [])
    ax = axes[1]
    width = 0.8 / len(modes)
    for k, (name, b) in enumerate(modes):
        xs = [i + (k - (len(modes) - 1) / 2) * width for i in range(2)]
        cpu = f" ({b['speedup_cpu']:.1f}x per CPU-s)" if "speedup_cpu" in b else ""
        bars = ax.bar(xs, [b["one"]["tokens_per_s"], b["many"]["tokens_per_s"]], width,
                      label=f"{name}: {b['speedup']:.1f}x{cpu}")
        ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks(range(2), ["1 client", f"{result['batching']['many']['clients']} clients"])
    ax.set_title("(b) aggregate throughput (continuous batching)")
    ax.set_ylabel("tokens / s")
    ax.legend()
    ax = axes[2]
    labels, p50, p99 = [], [], []
    for name, b in modes:
        for key, label in (("one", "1"), ("many", str(b["many"]["clients"]))):
            labels.append(f"{name}\n{label} client{'s' if label != '1' else ''}")
            p50.append(b[key]["ttft_p50_s"] * 1e3)
            p99.append(b[key]["ttft_p99_s"] * 1e3)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("(c) time to first token")
    ax.legend()
    fig.suptitle(f"{result['model']} ({result['params'] / 1e6:.2f}M params), {result['threads']} torch thread(s), "
                 f"load average {result['load_average']['before'][0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="an untrained 2-layer model, few tokens (CI smoke test)")
    p.add_argument("--checkpoint", help="serve this checkpoint (RoPE) instead of the tiny plan's")
    p.add_argument("--new-tokens", type=int, help="tokens per request (default 96; --quick 16)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests-per-client", type=int, help="default 3; --quick 1")
    p.add_argument("--repeats", type=int, help="timed runs of (a) (default 5; --quick 2)")
    p.add_argument("--rounds", type=int, help="alternated 1-client / many-client runs of (b) (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both engines (default 1)")
    p.add_argument("--http", action="store_true", help="also measure (b), (c) through Ray Serve over HTTP")
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel degree of the --http deployment")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    p.add_argument("--workdir", default=str(ROOT / "runs" / "bench" / "serve"))
    p.add_argument("--replot", help="redraw the PNG of an existing JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), Path(args.replot).with_suffix(".png"))
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    new_tokens = args.new_tokens or (16 if args.quick else 96)
    per_client = args.requests_per_client or (1 if args.quick else 3)
    repeats = args.repeats or (2 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    started = time.perf_counter()
    if args.checkpoint:
        ck = Path(args.checkpoint)
    elif args.quick:
        shutil.rmtree(workdir / "quick", ignore_errors=True)
        ck = untrained_checkpoint(workdir)
    else:
        ck = tiny_rope_checkpoint(workdir)
    torch.set_num_threads(args.threads)
    tok = Tokenizer.load(ck / "tokenizer")
    cfg = ModelConfig.model_validate_json((ck / "config.json").read_text())
    before = load_average()
    with torch.device("meta"):
        params = GPT(cfg).num_params()
    result = {"model": "untrained" if args.quick else f"{ck.parent.parent.name}/{ck.name}", "checkpoint": str(ck),
              "params": params, "threads": args.threads, "quick": args.quick}
    result["single_request"] = single_request(ck, tok, new_tokens, repeats, workdir)
    result["batching"] = batching(ck, tok, new_tokens, args.clients, per_client, rounds)
    if args.http:
        result["http"] = batching_http(ck, new_tokens, args.clients, per_client, rounds, args.tp)
    result["load_average"] = {"before": before, "after": load_average()}
    result["goals"] = {"single_request_speedup>=1.5": result["single_request"]["speedup"] >= 1.5,
                       f"{args.clients}_clients_speedup>=6": result["batching"]["speedup"] >= 6}
    result["wall_s_total"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
