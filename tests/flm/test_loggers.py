"""flm/loggers.py: real TensorBoard event files read back by TensorBoard's own reader; W&B and MLflow offline, and a
failing tracker never failing a run."""

import importlib.machinery
import json
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flm.config import FLMConfigError, GrowthPlan
from flm.loggers import Trackers, resolve_loggers
from flm.train import Trainer, read_metrics
from tests.conftest import micro_plan


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_metric_stream_and_growth(micro_data, tmp_path):
    plan = micro_plan(micro_data, tmp_path / "run", loggers=["tensorboard"], peak_tflops=1.0)
    Trainer(plan).fit(max_steps=7)  # killed at step 7: resumes from the step-5 checkpoint
    Trainer(plan).fit(max_steps=14)  # past the growth at step 12
    records = read_metrics(tmp_path / "run")
    got = tensorboard_scalars(tmp_path / "run")
    steps = [r for r in records if "event" not in r]
    for key, tag in [("loss", "train/loss"), ("lr", "train/lr"), ("tokens", "train/tokens"), ("flops", "train/flops"),
                     ("mfu", "train/mfu"), ("stage", "train/stage"), ("val_loss", "val/loss")]:
        want = [(r["step"], r[key]) for r in steps if key in r]
        assert [s for s, _ in got[tag]] == [s for s, _ in want], f"{tag}: each step once, the resumed run's"
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want], rel=1e-6), tag
    assert [s for s, _ in got["train/loss"]] == list(range(1, 15))
    assert got["events/growth"] == [(12, 1.0)], "the growth marker: the new stage at its step"
    acc = EventAccumulator(str(tmp_path / "run/tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (text,) = acc.Tensors("events/growth/text_summary")
    growth = json.loads(text.tensor_proto.string_val[0].decode().strip("`"))
    assert text.step == 12 and growth == next(r for r in records if r.get("event") == "growth")


def test_loggers_setting_implies_jsonl(monkeypatch):
    assert resolve_loggers(["wandb", "tensorboard", "wandb"]) == ["jsonl", "wandb", "tensorboard"]
    assert resolve_loggers(["jsonl"]) == resolve_loggers([]) == ["jsonl"]
    assert resolve_loggers(None) == ["jsonl", "tensorboard"], "the default: TensorBoard where installed"
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert resolve_loggers(None) == ["jsonl"]
    with pytest.raises(FLMConfigError, match=r"tensorboard not installed; pip install 'flm\[tensorboard\]'"):
        Trackers(micro_plan("data", "out", loggers=["tensorboard"]), None)
    with pytest.raises(Exception, match="loggers"):
        GrowthPlan.model_validate({**micro_plan("d", "o").model_dump(), "train": {"loggers": ["csv"]}})


def fake_module(monkeypatch, name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


STEP = {"step": 3, "stage": 0, "tokens": 384, "flops": 1e9, "loss": 5.5, "lr": 0.01, "tokens_per_s": 100.0,
        "mfu": None, "val_loss": 5.6}
GROWTH = {"event": "growth", "step": 4, "stage": 1, "mode": "offline", "params": 1000}


def test_wandb_runs_offline_and_logs_at_the_optimizer_step(monkeypatch, tmp_path):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    fake_module(monkeypatch, "wandb", init=lambda **kw: calls.append(("init", kw)) or Run())
    monkeypatch.delenv("WANDB_MODE", raising=False)
    seen = []
    trackers = Trackers(micro_plan("data", tmp_path, loggers=["wandb"]), tmp_path, then=seen.append)
    trackers(STEP)
    trackers(GROWTH)
    trackers.close()
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(tmp_path) and init["resume"] == "allow"
    assert init["name"] == "micro" and len(init["id"]) == 16
    assert calls[1] == ("log", {"train/loss": 5.5, "val/loss": 5.6, "train/lr": 0.01, "train/tokens": 384.0,
                                "train/flops": 1e9, "train/tokens_per_s": 100.0, "train/stage": 0.0}, 3)
    assert calls[2][1]["events/growth"] == 1 and calls[2][2] == 4 and calls[3] == ("finish",)
    assert seen == [STEP, GROWTH], "the caller's hook still sees every record"


def test_mlflow_writes_to_a_database_file_in_the_run(monkeypatch, tmp_path):
    calls = []

    class Client:
        def __init__(self, tracking_uri):
            calls.append(("uri", tracking_uri))

        def get_experiment_by_name(self, name):
            return None

        def create_experiment(self, name, artifact_location):
            calls.append(("experiment", name, artifact_location))
            return "7"

        def search_runs(self, ids, query, max_results):
            calls.append(("search", ids, query))
            return []

        def create_run(self, exp_id, run_name, tags):
            return types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))

        def log_batch(self, run_id, metrics):
            calls.append(("batch", run_id, {m[0]: (m[1], m[3]) for m in metrics}))

        def log_text(self, run_id, text, path):
            calls.append(("text", path))

        def set_terminated(self, run_id):
            calls.append(("end", run_id))

    fake_module(monkeypatch, "mlflow")
    fake_module(monkeypatch, "mlflow.tracking", MlflowClient=Client)
    fake_module(monkeypatch, "mlflow.entities", Metric=lambda key, value, ts, step: (key, value, ts, step))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    trackers = Trackers(micro_plan("data", tmp_path, loggers=["mlflow", "jsonl"]), tmp_path)
    trackers(STEP)
    trackers(GROWTH)
    trackers.close()
    assert calls[0] == ("uri", f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    assert calls[1] == ("experiment", "micro", (tmp_path / "mlflow-artifacts").resolve().as_uri())
    assert calls[3] == ("batch", "r1", {"train/loss": (5.5, 3), "val/loss": (5.6, 3), "train/lr": (0.01, 3),
                                        "train/tokens": (384.0, 3), "train/flops": (1e9, 3),
                                        "train/tokens_per_s": (100.0, 3), "train/stage": (0.0, 3)})
    assert calls[4:] == [("text", "events/growth_00000004.json"), ("batch", "r1", {"events/growth": (1.0, 4)}),
                         ("end", "r1")]


def test_a_failing_tracker_never_fails_the_run(micro_data, tmp_path, monkeypatch):
    def no_network(**kw):
        raise ConnectionError("api.wandb.ai unreachable")

    fake_module(monkeypatch, "wandb", init=no_network)
    plan = micro_plan(micro_data, tmp_path / "run", loggers=["wandb", "tensorboard"])
    with pytest.warns(RuntimeWarning, match="wandb failed and is off for the rest of this run: ConnectionError"):
        Trainer(plan).fit(max_steps=3)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert [s for s, _ in tensorboard_scalars(tmp_path / "run")["train/loss"]] == [1, 2, 3]
