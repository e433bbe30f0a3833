"""Fixtures of the serving tests: a grown micro checkpoint (the finished plan, and one saved mid-ramp with its growth
masks) and one local Ray cluster shared by the package's modules (starting Ray costs ~20 s on the shared machine;
package scope keeps it out of other packages' way)."""

import os
import shutil

import pytest
import ray
import torch

from flm.checkpoint import step_dir
from flm.train import Trainer
from tests.conftest import micro_plan

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
RAMP_STEP = 26  # inside the width growth's mask ramp (steps 24 to 28)


@pytest.fixture(scope="session")
def grown(micro_data, tmp_path_factory) -> dict:
    """{"final": the micro plan's last checkpoint (3x64, grown twice), "ramp": step 26, masks at 0.5}."""
    out = tmp_path_factory.mktemp("served")
    plan = micro_plan(micro_data, out / "run", checkpoint_every=13, eval_every=12)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-core machine shared with other jobs: more threads only contend (2x slower)
    try:
        Trainer(plan).fit(max_steps=RAMP_STEP)
        shutil.copytree(step_dir(out / "run", RAMP_STEP), out / "ramp")
        Trainer(plan).fit()
    finally:
        torch.set_num_threads(threads)
    return {"final": step_dir(out / "run", 36), "ramp": out / "ramp"}


@pytest.fixture(scope="package")
def ray_cluster():
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
