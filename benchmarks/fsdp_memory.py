"""Does backend fsdp really shard? A ~100M-parameter model (12 x 768, vocabulary 8192) takes one AdamW step in one
process and on 4 gloo ranks (tp 2 x dp 2, and dp 4); each rank reports the bytes of the parameters, gradients and
optimizer state it holds (from its tensors: a DTensor counts its local shard) and its peak RSS growth over the
process before the model existed. Prints JSON, draws a PNG.

    .venv/bin/python benchmarks/fsdp_memory.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
from pathlib import Path

import torch
import torch.distributed as td
import torch.multiprocessing as mp

from flm import mup
from flm.config import ModelConfig
from flm.model import GPT

CONFIG = ModelConfig(n_layer=12, d_model=768, n_head=12, vocab_size=8192, seq_len=64, base_width=256)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> int:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS, so the peak counts from here, not from
    whatever the process did before (imports: under pytest a spawned rank imports its plugins too). Returns the
    current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # an older kernel: the peak then includes what came before
    return _rss_bytes()


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _states(model, optimizer) -> dict[str, int]:
    from flm.parallelize import local_bytes

    params = list(model.parameters())
    opt = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": local_bytes(opt)}


def _step(model, optimizer, cfg: ModelConfig) -> None:
    idx = torch.randint(0, cfg.vocab_size, (1, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    model(idx, idx)[1].backward()
    optimizer.step()  # AdamW's moments now exist; gradients are kept to be counted


def measure_single(cfg: ModelConfig = CONFIG) -> dict:
    torch.set_num_threads(1)
    base = _reset_peak_rss()
    model = GPT(cfg, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(mup.param_groups(model, cfg, 1e-4, 0.1))
    _step(model, optimizer, cfg)
    return {**_states(model, optimizer), "peak_rss_growth": _peak_rss_bytes() - base}


def _rank(rank: int, world: int, tp: int, port: int, cfg_json: str, out: dict) -> None:
    from flm.parallelize import build_sharded, device_mesh, init_shards

    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        cfg = ModelConfig.model_validate_json(cfg_json)
        base = _reset_peak_rss()
        model = build_sharded(cfg, device_mesh(world, tp), torch.device("cpu"))
        init_shards(model, seed=0)
        optimizer = torch.optim.AdamW(mup.param_groups(model, cfg, 1e-4, 0.1))
        _step(model, optimizer, cfg)
        out[rank] = {**_states(model, optimizer), "peak_rss_growth": _peak_rss_bytes() - base}
    finally:
        td.destroy_process_group()


def measure_sharded(world: int, tp: int, cfg: ModelConfig = CONFIG) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(world, tp, port, cfg.model_dump_json(), out), nprocs=world)
        return [dict(out[r]) for r in range(world)]


def _single_in_subprocess(cfg: ModelConfig) -> dict:
    """measure_single in a fresh process, so its peak RSS is its own (not this driver's)."""
    with mp.Manager() as manager:
        out = manager.dict()
        p = mp.get_context("spawn").Process(target=_single_target, args=(cfg.model_dump_json(), out))
        p.start()
        p.join()
        return dict(out["single"])


def _single_target(cfg_json: str, out: dict) -> None:
    out["single"] = measure_single(ModelConfig.model_validate_json(cfg_json))


def run(cfg: ModelConfig = CONFIG, layouts=((4, 2), (4, 1))) -> dict:
    """Both arms in fresh processes with glibc's mmap threshold fixed at 128 KiB. By default glibc raises that
    threshold after freeing a large block, so the per-block all-gather buffers FSDP frees go back to the heap
    instead of the OS and the RSS peak keeps growing (measured: a dp-4 rank's peak RSS grew 0.93x as much as the
    single process's with the default, though it holds a quarter of the tensors; 0.2-0.3x with the fixed threshold)."""
    from flm.flops import param_count

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 << 10))  # read by each new process's allocator
    single = _single_in_subprocess(cfg)
    result = {"params": param_count(cfg), "malloc_mmap_threshold": os.environ["MALLOC_MMAP_THRESHOLD_"],
              "single": single, "layouts": {}}
    states = lambda r: r["params"] + r["grads"] + r["optimizer"]  # noqa: E731
    for world, tp in layouts:
        ranks = measure_sharded(world, tp, cfg)
        result["layouts"][f"tp{tp}xdp{world // tp}"] = {
            "ranks": ranks,
            "max_states_ratio": max(states(r) for r in ranks) / states(single),
            "max_rss_ratio": max(r["peak_rss_growth"] for r in ranks) / single["peak_rss_growth"],
        }
    return result


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    names = ["1 process"] + [f"{k} (worst rank)" for k in result["layouts"]]
    rows = [result["single"]] + [max(v["ranks"], key=lambda r: r["peak_rss_growth"])
                                 for v in result["layouts"].values()]
    kinds = ("params", "grads", "optimizer")
    bottom = [0.0] * len(rows)
    for kind in kinds:
        vals = [r[kind] / 2**20 for r in rows]
        ax.bar(names, vals, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.plot(names, [r["peak_rss_growth"] / 2**20 for r in rows], "ko-", label="peak RSS growth")
    ax.set_ylabel("MiB per process")
    ax.set_title(f"{result['params'] / 1e6:.0f}M parameters, one AdamW step")
    ax.legend()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    result = run()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fsdp_memory.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "fsdp_memory.png")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "ranks"} for k, v in result["layouts"].items()}
                     | {"single": result["single"], "params": result["params"]}, indent=2))


if __name__ == "__main__":
    main()
