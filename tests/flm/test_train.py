"""flm/train.py: exact resume, exact growth inside training, the LR schedule, accumulation, corrupted checkpoints."""

import json
import shutil

import pytest

from flm.checkpoint import list_checkpoints
from flm.config import GrowthPlan
from flm.flops import flops_per_token
from flm.train import Trainer, TrainerHooks, lr_at, read_metrics
from tests.conftest import micro_plan

TIMING = ("tokens_per_s", "mfu")


def stream(run_dir) -> list[dict]:
    """The metric stream without its wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference_run(micro_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    summaries = Trainer(micro_plan(micro_data, out)).fit()
    return out, summaries


def test_full_run(reference_run):
    out, summaries = reference_run
    assert [s["stage"] for s in summaries] == [0, 1, 2]
    assert summaries[-1]["steps"] == 36
    records = stream(out)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 36 and losses[-1] < losses[0] - 0.5  # it learns
    assert [r["stage"] for r in records if r.get("event") == "growth"] == [1, 2]
    # every stage-end checkpoint is kept as the stage's output; the others are pruned to keep_checkpoints
    names = [p.name for p in list_checkpoints(out)]
    assert {"step_00000012", "step_00000024", "step_00000036"} <= set(names) and len(names) <= 5


def test_growth_keeps_the_loss(reference_run):
    out, _ = reference_run
    events = [r for r in read_metrics(out) if r.get("event") == "growth"]
    assert len(events) == 2
    for e in events:
        assert e["dloss"] <= 1e-5 and e["max_abs_dlogits"] <= 1e-4
        # with a ramp the first step after growth trains at mask 0: the logged model is the masked one
        assert (e["ramp_steps"], e["mask"]) == (4, 0.0) and e["dloss"] == e["masked_dloss"]


@pytest.mark.parametrize("growth", ["offline", "online"])
def test_growth_without_ramp_logs_the_model_that_trains(micro_data, tmp_path, growth):
    """ramp_steps 0 removes the masks at once: the new weights train at full scale from the first step, so the
    growth record's dloss is that model's (not the masked model's, which is exact and logged as masked_dloss)."""
    data = micro_plan(micro_data, tmp_path).model_dump()
    data["stages"][1].update(ramp_steps=0, growth=growth)
    Trainer(GrowthPlan.model_validate(data)).fit(max_steps=13)
    (event,) = [r for r in read_metrics(tmp_path) if r.get("event") == "growth"]
    assert (event["ramp_steps"], event["mask"]) == (0, 1.0)
    assert event["masked_dloss"] <= 1e-5 and event["masked_max_abs_dlogits"] <= 1e-4  # the operators are exact
    assert event["max_abs_dlogits"] > 1e-3  # a new interleaved block at full scale changes the function
    assert event["dloss"] != event["masked_dloss"]


def test_ffn_growth_retunes_the_projection_lr_and_decay(micro_data, tmp_path):
    """Stage 1 grows only the FFN, 128 -> 512 at d_model 32 = base_width: from the growth on, mlp.proj (fan-in 4x
    the base model's) trains at a quarter of the stage's LR with 4x the weight decay, every other weight as before."""
    data = micro_plan(micro_data, tmp_path).model_dump()
    data["stages"][1].update(grow={"d_ffn": 512}, depth_placement="stack")
    plan = GrowthPlan.model_validate(data)
    trainer = Trainer(plan)
    trainer.fit(max_steps=13)  # stage 0, the growth at step 12, one step of stage 1
    names = {id(p): n for n, p in trainer.raw.named_parameters()}
    lr, wd = lr_at(plan, 12), plan.train.optim.weight_decay
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            scale = 4.0 if names[id(p)].endswith("mlp.proj.weight") else 1.0
            assert group["lr"] == pytest.approx(lr / scale), names[id(p)]
            if group["weight_decay"]:
                assert group["weight_decay"] == pytest.approx(wd * scale), names[id(p)]


@pytest.mark.parametrize("stop_at", [7, 12, 14, 26, 31], ids=lambda s: f"stop{s}")
def test_interrupted_run_resumes_bit_identically(micro_data, tmp_path, reference_run, stop_at):
    """Stops mid-stage, at a stage end, and inside both mask ramps (steps 12-16 and 24-28)."""
    plan = micro_plan(micro_data, tmp_path)
    assert Trainer(plan).fit(max_steps=stop_at) is not None
    Trainer(plan).fit()
    assert stream(tmp_path) == stream(reference_run[0])


def test_online_growth_equals_offline(micro_data, tmp_path, reference_run):
    plan = micro_plan(micro_data, tmp_path)
    data = plan.model_dump()
    for stage in data["stages"][1:]:
        stage["growth"] = "online"
    Trainer(GrowthPlan.model_validate(data)).fit()
    online = [{k: v for k, v in r.items() if k != "mode"} for r in stream(tmp_path)]
    offline = [{k: v for k, v in r.items() if k != "mode"} for r in stream(reference_run[0])]
    assert online == offline


def test_corrupted_checkpoint_falls_back_with_a_warning(micro_data, tmp_path, reference_run):
    plan = micro_plan(micro_data, tmp_path)
    Trainer(plan).fit(max_steps=22)
    newest = list_checkpoints(tmp_path)[-1]
    assert newest.name == "step_00000020"
    (newest / "model.safetensors").write_bytes(b"\0" * 100)  # a torn write
    partial = tmp_path / "checkpoints" / "step_00000021"
    shutil.copytree(newest, partial)
    (partial / "checkpoint.json").unlink()  # never finished
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        Trainer(plan).fit()
    assert stream(tmp_path) == stream(reference_run[0])


def test_lr_schedule(micro_data, tmp_path):
    plan = micro_plan(micro_data, tmp_path)
    lrs = [lr_at(plan, s) for s in range(36)]
    assert lrs[0] == pytest.approx(1e-2 / 2) and lrs[1] == pytest.approx(1e-2)  # 2 warmup steps
    assert lrs[12] == pytest.approx(8e-3 / 2) and lrs[13] == pytest.approx(8e-3)  # each stage its own LR
    assert lrs[25] == pytest.approx(6e-3)
    assert all(a >= b for a, b in zip(lrs[1:12], lrs[2:12], strict=False))  # cosine decays
    assert lrs[35] == pytest.approx(1e-4)  # the last step trains at min_lr


def test_gradient_accumulation_matches_full_batch(micro_data, tmp_path, reference_run):
    Trainer(micro_plan(micro_data, tmp_path, micro_batch_size=2)).fit(stages=[0])
    ours = [r["loss"] for r in stream(tmp_path) if "loss" in r]
    ref = [r["loss"] for r in stream(reference_run[0]) if "loss" in r][:12]
    assert ours == pytest.approx(ref, abs=1e-5)


def test_a_run_dir_holds_one_plan(micro_data, tmp_path):
    Trainer(micro_plan(micro_data, tmp_path)).fit(max_steps=1)
    data = micro_plan(micro_data, tmp_path).model_dump()
    data["stages"][0]["lr"] = 5e-3
    with pytest.raises(ValueError, match="different plan"):
        Trainer(GrowthPlan.model_validate(data))


def test_metrics_are_json_lines_with_the_documented_fields(reference_run):
    out, _ = reference_run
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "stage", "tokens", "flops", "loss", "lr", "tokens_per_s", "mfu"} <= set(first)


class Calls(TrainerHooks):
    def __init__(self):
        self.starts, self.fed = [], []

    def on_start(self, trainer):
        self.starts.append((trainer.stage, trainer.step))

    def on_step(self, trainer, tokens):
        self.fed.append(tokens)

    def on_record(self, record):
        return {**record, "seen": True}


def test_hooks_see_the_start_each_step_and_each_record(micro_data, tmp_path):
    """The loop's extension points (cluster/train.py's StageHooks use them): where a launch starts, the tokens fed
    per step, and each record before it is written. MFU is the flops.py formula at train.peak_tflops."""
    plan = micro_plan(micro_data, tmp_path, peak_tflops=1.0)
    first, second = Calls(), Calls()
    Trainer(plan, hooks=first).fit(max_steps=6)
    Trainer(plan, hooks=second).fit(max_steps=7)  # resumes from the step-5 checkpoint
    assert first.starts == [(0, 0)] and second.starts == [(0, 5)]
    assert first.fed == [4 * 32] * 6 and second.fed == [4 * 32] * 2  # batch_size x seq_len per step
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7] and all(r["seen"] for r in records)
    cfg = plan.model_configs()[0]
    assert records[0]["mfu"] == pytest.approx(flops_per_token(cfg) * records[0]["tokens_per_s"] / 1e12)


def test_a_stage_needs_its_predecessor_finished(micro_data, tmp_path):
    plan = micro_plan(micro_data, tmp_path)
    with pytest.raises(ValueError, match="no checkpoint of the previous stage"):
        Trainer(plan).fit(stages=[1])
    Trainer(plan).fit(max_steps=5)
    with pytest.raises(ValueError, match="stage 0 has not finished"):
        Trainer(plan).fit(stages=[1])
