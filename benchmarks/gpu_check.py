"""The GPU check of backend fsdp (run by benchmarks/gpu_check.sh on a CUDA machine): a ~1B-parameter model trained
with FSDP2 (bf16 compute, fp32 masters, full activation checkpointing) for 30 steps on one GPU, tokens/s and MFU from
flm/flops.py, then the trained checkpoint consolidated and decoded by the serving engine's model (TP 1).
Prints one JSON line. Needs a CUDA torch; on a CPU it refuses."""

import json
import os
import sys
import time

import torch
import torch.distributed as td

from flm.config import GrowthPlan
from flm.fsdp import FSDPDist
from flm.train import Trainer, read_metrics

PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "989"))  # H100/H200 dense bf16


def main(out: str) -> None:
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device")
    td.init_process_group("nccl", rank=0, world_size=1, init_method="tcp://127.0.0.1:29533")
    torch.cuda.set_device(0)
    model = {"n_layer": 20, "d_model": 2048, "n_head": 16, "vocab_size": 2048, "seq_len": 2048, "base_width": 256,
             "output_mult": 2.0}
    plan = GrowthPlan.model_validate({
        "name": "gpu-check", "stages": [{"model": model, "tokens": 30 * 16 * 2048, "lr": 3e-4, "batch_size": 16,
                                         "warmup_samples": 32, "layout": {"backend": "fsdp", "use_gpu": True}}],
        "train": {"data": "shakespeare", "out": out, "micro_batch_size": 8, "log_every": 5, "eval_every": 30,
                  "checkpoint_every": 30, "precision": "bf16", "device": "cuda", "peak_tflops": PEAK_TFLOPS,
                  "activation_checkpointing": "full"}})
    dist = FSDPDist(rank=0, world_size=1, device=torch.device("cuda"), param_dtype=torch.bfloat16,
                    activation_checkpointing=True)
    t0 = time.perf_counter()
    Trainer(plan, dist).fit()
    train_s = time.perf_counter() - t0
    td.destroy_process_group()
    records = [r for r in read_metrics(out) if "loss" in r]
    steady = records[1:]  # the first window includes compilation of kernels and the allocator's warm-up
    from flm.checkpoint import list_checkpoints, load_model
    from flm.generate import SamplingParams, generate

    gpt, tok = load_model(list_checkpoints(out)[-1], "cuda")
    t1 = time.perf_counter()
    text = generate(gpt, tok, ["To be, or not to be"], SamplingParams(max_tokens=64, temperature=0.0))
    print(json.dumps({"params": gpt.num_params(), "train_seconds": train_s,
                      "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
                      "mfu": sum(r["mfu"] for r in steady) / len(steady), "final_loss": records[-1]["loss"],
                      "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
                      "decode_64_tokens_s": time.perf_counter() - t1, "sample": str(text)[:120]}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-check")
