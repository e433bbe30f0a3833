"""Experiment trackers: the training loop's metric records, mirrored where people already look.

`metrics.jsonl` (written by the loop itself) is always kept; `train.loggers` adds TensorBoard (through
`torch.utils.tensorboard`, under `<run dir>/tensorboard`), Weights & Biases and MLflow. Left unset, it is jsonl plus
TensorBoard where the `tensorboard` package is installed.

Every record becomes scalars at its optimizer step: train/loss, val/loss, train/lr, train/tokens, train/flops,
train/mfu, train/tokens_per_s, train/stage. An event (a growth) becomes a text entry holding the whole record and a
marker: a point of the scalar `events/<event>` (its value the new stage) at the step it happened.

Offline-safe: W&B runs in offline mode unless WANDB_MODE says otherwise (`wandb sync` uploads later), MLflow writes
to `mlflow.db` (SQLite) in the run directory unless MLFLOW_TRACKING_URI says otherwise
(`mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow.db`). A tracker that fails (no network, a
full disk, a broken install) is dropped with one warning: it never fails or stops a run. The loop calls the trackers
on rank 0 only (`Trainer._record`), so under Ray Train one process logs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from flm.config import FLMConfigError, GrowthPlan

LOGGERS = ("jsonl", "tensorboard", "wandb", "mlflow")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # tracker -> module it needs
SCALARS = {"loss": "train/loss", "val_loss": "val/loss", "lr": "train/lr", "tokens": "train/tokens",
           "flops": "train/flops", "mfu": "train/mfu", "tokens_per_s": "train/tokens_per_s", "stage": "train/stage"}


def resolve_loggers(loggers: list[str] | None) -> list[str]:
    """The trackers a run writes to: `loggers` with jsonl first, or (None) jsonl and TensorBoard where installed."""
    if loggers is None:
        return ["jsonl"] + (["tensorboard"] if _installed("tensorboard") else [])
    return ["jsonl"] + [name for name in dict.fromkeys(loggers) if name != "jsonl"]


def _installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def scalars(record: dict) -> dict[str, float]:
    """A step record's numbers under their tracker tags (values that are None, such as MFU without a peak, are
    left out)."""
    return {tag: float(record[k]) for k, tag in SCALARS.items() if isinstance(record.get(k), int | float)}


def run_id(run_dir: Path) -> str:
    """A stable id for a run directory, so a resumed run continues the same W&B / MLflow run."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


class TensorBoardTracker:
    def __init__(self, run_dir: Path, name: str, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides the events the killed one wrote after the checkpoint it resumes from
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=first_step)

    def log(self, record: dict) -> None:
        step = record["step"]
        if "event" in record:
            self.writer.add_text(f"events/{record['event']}", f"`{json.dumps(record)}`", step)
            self.writer.add_scalar(f"events/{record['event']}", record.get("stage", 0), step)
        else:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # records come every log_every steps: cheap, and a killed run keeps what it logged

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, first_step: int):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "flm"), name=name, id=run_id(run_dir),
                              resume="allow", dir=str(run_dir), mode=os.environ.get("WANDB_MODE", "offline"))

    def log(self, record: dict) -> None:
        if "event" in record:
            self.run.log({f"events/{record['event']}": record.get("stage", 0),
                          f"events/{record['event']}_record": json.dumps(record)}, step=record["step"])
        else:
            self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, name: str, first_step: int):
        from mlflow.tracking import MlflowClient

        # MLflow 3 refuses its old ./mlruns file store: a SQLite file in the run directory is the local store
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(name)
        exp_id = experiment.experiment_id if experiment else self.client.create_experiment(
            name, artifact_location=None if "MLFLOW_TRACKING_URI" in os.environ else
            (run_dir / "mlflow-artifacts").resolve().as_uri())
        tag = run_id(run_dir)
        runs = self.client.search_runs([exp_id], f"tags.flm_run_id = '{tag}'", max_results=1)
        self.run_id = runs[0].info.run_id if runs else self.client.create_run(
            exp_id, run_name=run_dir.name, tags={"flm_run_id": tag}).info.run_id

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), record["step"]
        if "event" in record:
            self.client.log_text(self.run_id, json.dumps(record), f"events/{record['event']}_{step:08d}.json")
            values = {f"events/{record['event']}": float(record.get("stage", 0))}
        else:
            values = scalars(record)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The loop's record hook: each record goes to the trackers `plan.train.loggers` names, then to `then`.

    Trackers open at the first record (only rank 0 records) and close with `close()` (the end of `fit`); a record
    after that opens them again.
    """

    def __init__(self, plan: GrowthPlan, run_dir: Path, then: Callable[[dict], None] | None = None):
        self.names = [n for n in resolve_loggers(plan.train.loggers) if n != "jsonl"]
        missing = [n for n in self.names if not _installed(n)]
        if missing:
            raise FLMConfigError(f"train.loggers: {', '.join(missing)} not installed; pip install "
                                 + " ".join(f"'flm[{n}]'" for n in missing) + " or remove it from train.loggers")
        self.plan, self.run_dir, self.then = plan, run_dir, then
        self.open: dict[str, object] | None = None

    def __call__(self, record: dict) -> None:
        if self.open is None:
            first = record["step"] + ("event" in record)  # an event repeats at the checkpoint's step on resume
            self.open = {}
            for name in list(self.names):  # a failing one leaves the list
                self._guard(name, lambda name=name: self.open.__setitem__(
                    name, TRACKERS[name](self.run_dir, self.plan.name, first)))
        for name, tracker in list(self.open.items()):
            self._guard(name, lambda tracker=tracker: tracker.log(record))
        if self.then is not None:
            self.then(record)

    def close(self) -> None:
        for name, tracker in list((self.open or {}).items()):
            self._guard(name, tracker.close)
        self.open = None

    def _guard(self, name: str, call: Callable[[], None]) -> None:
        """Run a tracker call; a failure drops that tracker with a warning, never the run."""
        try:
            call()
        except Exception as e:
            self.open.pop(name, None)
            self.names.remove(name)
            warnings.warn(f"train.loggers: {name} failed and is off for the rest of this run: "
                          f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
