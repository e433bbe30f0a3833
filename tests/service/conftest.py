"""Fixtures of the serving tests: a grown micro checkpoint (the finished plan, and one saved mid-ramp with its growth
masks) and one local Ray cluster shared by the package's modules (starting Ray costs ~20 s on the shared machine;
package scope keeps it out of other packages' way)."""

import shutil

import pytest
import torch

from flm.checkpoint import step_dir
from flm.train import Trainer
from tests.conftest import local_ray, micro_plan

RAMP_STEP = 26  # inside the width growth's mask ramp (steps 24 to 28)


@pytest.fixture(scope="session")
def grown(micro_data, tmp_path_factory) -> dict:
    """{"final": the micro plan's last checkpoint (3x64, grown twice), "ramp": step 26, mid-ramp (masks < 1)}."""
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
    with local_ray(num_cpus=2):
        yield
