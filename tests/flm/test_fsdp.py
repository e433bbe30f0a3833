"""backend fsdp (flm/fsdp.py, flm/parallelize.py, flm/sharded.py) on real gloo ranks: FSDP2 x TP training matches the
single process, sharded checkpoints resume exactly and reshard, growth of a sharded model equals in-memory growth."""

import multiprocessing
import shutil
import socket

import pytest
import torch
import torch.distributed as td
import torch.multiprocessing as mp

from flm import mup
from flm.checkpoint import consolidate, list_checkpoints, load_checkpoint
from flm.config import GrowthPlan
from flm.growth import grow_model, transfer_adamw_state
from flm.model import GPT
from flm.offline_growth import CheckpointReader
from flm.sharded import is_sharded
from flm.train import Trainer, read_metrics
from tests.conftest import micro_plan

LAYOUTS = {"dp2": (2, 1), "tp2": (2, 2), "tp2xdp2": (4, 2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, tp: int, port: int, plan_json: str, stops: list) -> None:
    from flm.fsdp import FSDPDist

    torch.set_num_threads(1)
    td.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        plan = GrowthPlan.model_validate_json(plan_json)
        for stop in stops:  # each fit is a fresh Trainer: a resume from the sharded checkpoint on disk
            Trainer(plan, FSDPDist(rank=rank, world_size=world, tp=tp)).fit(stages=[0, 1], max_steps=stop)
    finally:
        td.destroy_process_group()


# Ranks fork from a server that imported torch, flm.fsdp and this module once per test process: a spawned rank spends
# ~5.5 s of CPU on those imports before its first step, ~55 s over the module's 10 ranks (measured: the module alone
# 80.4 s with spawned ranks, 55.5 s forked from the server; it must list this module, or each rank imports it again).
multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "flm.fsdp", __name__])


def run_ranks(plan: GrowthPlan, world: int, tp: int, stops=(None,)) -> None:
    mp.start_processes(_rank, args=(world, tp, _free_port(), plan.model_dump_json(), list(stops)), nprocs=world,
                       start_method="forkserver")


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def start(micro_data, tmp_path_factory):
    """A single-file checkpoint at step 5 of stage 0 (trained by one process), and the one-process run from it
    through stage 1 (steps 6-24, growth at 12)."""
    base = tmp_path_factory.mktemp("base")
    Trainer(micro_plan(micro_data, base)).fit(stages=[0], max_steps=5)
    single = tmp_path_factory.mktemp("single")
    shutil.copytree(base, single, dirs_exist_ok=True)
    Trainer(micro_plan(micro_data, single)).fit(stages=[0, 1])
    return base, single


@pytest.fixture(scope="module")
def tp2xdp2(micro_data, start, tmp_path_factory):
    """tp 2 x dp 2 from the same checkpoint, stopped at step 11 and 17 and each time resumed by new Trainers from
    the newest sharded checkpoint (steps 10 and 15)."""
    out = tmp_path_factory.mktemp("tp2xdp2")
    shutil.copytree(start[0], out, dirs_exist_ok=True)
    run_ranks(micro_plan(micro_data, out), 4, 2, stops=(11, 17, None))
    return out


@pytest.fixture(scope="module")
def tp2(micro_data, start, tmp_path_factory):
    """tp 2 from the step-5 checkpoint to the end of stage 0 (step 12), uninterrupted."""
    out = tmp_path_factory.mktemp("tp2")
    shutil.copytree(start[0], out, dirs_exist_ok=True)
    run_ranks(micro_plan(micro_data, out), *LAYOUTS["tp2"], stops=(12,))
    return out


def test_dp2_matches_single_process(micro_data, start, tmp_path):
    shutil.copytree(start[0], tmp_path, dirs_exist_ok=True)
    run_ranks(micro_plan(micro_data, tmp_path), *LAYOUTS["dp2"], stops=(12,))
    got, want = losses(tmp_path), losses(start[1])[:12]
    assert len(got) == 12 and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5


def test_tp2_matches_single_process(start, tp2):
    got, want = losses(tp2), losses(start[1])[:12]
    assert len(got) == 12 and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5


def test_resume_at_the_same_layout_is_bit_identical(micro_data, start, tp2, tmp_path):
    """tp 2 stopped at step 11 and resumed by new processes from its sharded step-10 checkpoint: the same metric
    stream as the uninterrupted tp 2 run, to the last digit."""
    shutil.copytree(start[0], tmp_path, dirs_exist_ok=True)
    run_ranks(micro_plan(micro_data, tmp_path), *LAYOUTS["tp2"], stops=(11, 12))
    timing = ("tokens_per_s", "mfu")
    strip = lambda run: [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run)]  # noqa: E731
    assert strip(tmp_path) == strip(tp2)


def test_tp2xdp2_matches_single_process_across_growth_and_resumes(start, tp2xdp2):
    """Steps 6-24 of tp 2 x dp 2 (a growth at step 12, a mask ramp, two resumes from sharded checkpoints) track the
    one-process run step by step."""
    got, want = losses(tp2xdp2), losses(start[1])
    assert len(got) == len(want) == 24
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5
    growth = [r for r in read_metrics(tp2xdp2) if r.get("event") == "growth"]
    assert len(growth) == 1 and growth[0]["dloss"] <= 1e-6
    assert all(is_sharded(p) for p in list_checkpoints(tp2xdp2) if p.name != "step_00000005")


def test_resume_at_another_layout(micro_data, tp2xdp2, tmp_path):
    """The sharded step-20 checkpoint of tp 2 x dp 2 resumed by one process: the same losses to 1e-5."""
    for p in list_checkpoints(tp2xdp2):
        dest = tmp_path / "checkpoints" / p.name
        if p.name in ("step_00000005", "step_00000010", "step_00000012", "step_00000015", "step_00000020"):
            shutil.copytree(p, dest)
    for name in ("metrics.jsonl", "plan.json"):
        shutil.copy(tp2xdp2 / name, tmp_path / name)
    Trainer(micro_plan(micro_data, tmp_path)).fit(stages=[1])
    got, want = losses(tmp_path), losses(tp2xdp2)
    assert len(got) == 24 and max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-5


def test_sharded_growth_equals_in_memory_growth(micro_data, tp2xdp2, tmp_path):
    """grown/stage1 (what rank 0 wrote from the sharded stage-end checkpoint) equals growing the consolidated
    checkpoint in memory: weights and AdamW moments, bit for bit."""
    plan = micro_plan(micro_data, tmp_path)
    whole = consolidate(tp2xdp2 / "checkpoints" / "step_00000012", tmp_path / "whole")
    ck = load_checkpoint(whole)
    stage, wd = plan.stages[1], plan.train.optim.weight_decay
    old = GPT.from_state(ck.config, ck.model)
    old_opt = torch.optim.AdamW(mup.param_groups(old, old.cfg, stage.lr, wd))
    old_opt.load_state_dict(ck.optimizer)
    new = grow_model(old, plan.model_configs()[1], stage.operator_order, stage.depth_placement,
                     torch.Generator().manual_seed(plan.seed * 1009 + 1))
    new_opt = torch.optim.AdamW(mup.param_groups(new, new.cfg, stage.lr, wd))
    transfer_adamw_state(old_opt, old, new_opt, new, stage.depth_placement)
    grown = load_checkpoint(tp2xdp2 / "grown" / "stage1")
    assert grown.model.keys() == new.state_dict().keys()
    assert all(torch.equal(grown.model[k], v) for k, v in new.state_dict().items())
    want = new_opt.state_dict()["state"]
    assert grown.optimizer["state"].keys() == want.keys()
    for i, state in want.items():
        assert all(torch.equal(grown.optimizer["state"][i][key], state[key]) for key in state)
    # a tensor at a time from the sharded checkpoint: its DCP index is read once, not once per tensor
    reader = CheckpointReader(tp2xdp2 / "checkpoints" / "step_00000012")
    for name in reader.param_names():
        assert torch.equal(reader.tensor(name), ck.model[name])
        reader.moment(name, "exp_avg")
    assert reader.step() == reader.step() == ck.optimizer["state"][0]["step"]
    assert reader._reader.reads == 1


def test_consolidate_cli(tp2xdp2, tmp_path, capsys):
    """`flm checkpoint consolidate` writes the single-file format; evaluation reads the sharded one directly."""
    from flm.checkpoint import load_model
    from flm.cli import main

    src = tp2xdp2 / "checkpoints" / "step_00000020"
    out = tmp_path / "single"
    assert main(["checkpoint", "consolidate", str(src), str(out)]) == 0, capsys.readouterr().err
    model, tokenizer = load_model(out)
    direct, _ = load_model(src)
    assert tokenizer is not None and not (out / "sharded").exists()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), direct.state_dict().values(),
                                                 strict=True))
    assert main(["checkpoint", "consolidate", str(out), str(tmp_path / "x")]) == 2
    assert "not a sharded checkpoint" in capsys.readouterr().err
