"""What the MSG masks cost: forward+backward tokens/s of flm.model.GPT with masks idle, and while a growth ramp is
active, against the plain reference implementation of the same config, all in one run (bf16 autocast where the
CPU has native bf16, fp32 otherwise: see flm/precision.py).

    .venv/bin/python benchmarks/overhead.py [--layers 4 --width 256 --batch 16 --seq 128 --rounds 7]

Prints JSON and writes benchmarks/results/overhead.{json,png}. Arms are measured in interleaved rounds and the median
round is reported, so slow drift of the machine hits every arm alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flm.config import ModelConfig
from flm.growth import grow_model
from flm.model import GPT
from flm.precision import autocast_dtype
from flm.reference import ReferenceGPT


def tokens_per_second(model, idx, steps: int, dtype) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(idx)
            logits = logits[0] if isinstance(logits, tuple) else logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), idx.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return idx.numel() * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="steps per arm per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--out", default="benchmarks/results/overhead.png")
    args = ap.parse_args()

    torch.manual_seed(0)
    dtype = autocast_dtype("cpu", args.precision)
    cfg = ModelConfig(n_layer=args.layers, d_model=args.width, n_head=args.width // args.head_dim,
                      vocab_size=args.vocab, seq_len=args.seq)
    half = ModelConfig(**{**cfg.model_dump(), "n_layer": max(1, args.layers // 2), "d_model": args.width // 2,
                          "n_head": args.width // 2 // args.head_dim, "d_ffn": 2 * args.width})
    ramping = grow_model(GPT(half), cfg)  # every mask kind is active: width, FFN, heads, depth gates
    ramping.set_mask_value(0.5)
    idle = GPT(cfg)
    ref = ReferenceGPT(cfg)
    ref.load_state_dict(idle.state_dict())
    arms = {"reference": ref, "masks idle": idle, "ramp active": ramping}
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.seq_len))
    for model in arms.values():
        tokens_per_second(model, idx, 2, dtype)  # warm-up
    rounds: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(args.rounds):
        for name, model in arms.items():
            rounds[name].append(tokens_per_second(model, idx, args.steps, dtype))
    tps = {k: statistics.median(v) for k, v in rounds.items()}
    result = {
        "config": cfg.model_dump(include={"n_layer", "d_model", "n_head", "d_ffn", "vocab_size", "seq_len"}),
        "batch": args.batch, "threads": torch.get_num_threads(), "autocast": str(dtype) if dtype else "none (fp32)",
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "idle_vs_reference": round(tps["masks idle"] / tps["reference"], 3),
        "ramp_overhead": round(1 - tps["ramp active"] / tps["masks idle"], 3),
        "goals": {"idle_vs_reference": ">= 0.97", "ramp_overhead": "<= 0.10"},
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(rounds, result, out)


def plot(rounds: dict[str, list[float]], result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(rounds)
    ax.bar(names, [statistics.median(rounds[n]) for n in names], color=["#888", "#2a7", "#d84"])
    for i, n in enumerate(names):
        ax.scatter([i] * len(rounds[n]), rounds[n], color="k", s=8, zorder=3)
    ax.set_ylabel(f"train tokens/s (fwd+bwd, {result['autocast']})")
    ax.set_title(f"MSG mask cost: idle/ref = {result['idle_vs_reference']:.3f}, "
                 f"ramp overhead = {result['ramp_overhead']:.1%}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
