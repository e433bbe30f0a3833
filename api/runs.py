"""What a job has done so far, read from its files (never from Ray): the training run directory's metric stream
and checkpoints (layout in cluster/train.py), a pipeline's `pipeline.json`, an eval's `iq.json`.

Reads are incremental and cached on (size, mtime) of each file, so polling `GET /v1/jobs/{id}` costs a `stat`
while nothing changes.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from flm.config import GrowthPlan
from flm.manifest import MANIFEST as CHECKPOINT_MANIFEST  # torch-free, unlike flm.checkpoint


@dataclass
class MetricStream:
    """The records of one metrics.jsonl read so far: `offset` is the byte position of the first unread line and
    `tail` the bytes just before it, to notice a rewrite (a resumed trainer truncates the file to its checkpoint's
    line count and appends again, which may leave it longer than what was read)."""

    records: list[dict] = field(default_factory=list)
    offset: int = 0
    tail: bytes = b""
    key: tuple[int, int] = (-1, -1)


@dataclass
class RunSummary:
    """What a job view shows of a run directory."""

    latest: dict | None  # the newest record with a training loss
    val_loss: float | None  # the newest validation loss
    checkpoints: list[str]  # complete checkpoints, oldest first, relative to the storage root


class RunReader:
    def __init__(self):
        self._streams: dict[Path, MetricStream] = {}
        self._summaries: dict[Path, tuple[tuple, RunSummary]] = {}
        self._lock = threading.Lock()

    def summary(self, run_dir: Path, root: Path) -> RunSummary:
        """Cached on the metric stream's (size, mtime) and the checkpoints directory's mtime: a checkpoint is
        renamed into that directory complete (flm.checkpoint.save_checkpoint), which changes its mtime."""
        key = (_stat_key(run_dir / "metrics.jsonl"), _stat_key(run_dir / "checkpoints"))
        cached = self._summaries.get(run_dir)
        if cached is not None and cached[0] == key:
            return cached[1]
        records = self.metrics(run_dir)
        latest = next((r for r in reversed(records) if "loss" in r), None)
        val = next((r for r in reversed(records) if "val_loss" in r), None)
        found = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in checkpoints(run_dir)]
        summary = RunSummary(latest, val["val_loss"] if val else None, found)
        self._summaries[run_dir] = (key, summary)
        return summary

    def metrics(self, run_dir: Path) -> list[dict]:
        """Every complete record of `run_dir/metrics.jsonl` (a resumed trainer truncates the file: re-read then)."""
        path = run_dir / "metrics.jsonl"
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            stream = self._streams.setdefault(path, MetricStream())
            if stream.key == key:
                return stream.records
            with open(path, "rb") as f:
                if stream.offset:
                    f.seek(stream.offset - len(stream.tail))
                    if f.read(len(stream.tail)) != stream.tail:  # rewritten since: read it again
                        stream.records, stream.offset, stream.tail = [], 0, b""
                        f.seek(0)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line being written has no newline yet: leave it for the next read
            new = []
            for line in data[:end].splitlines():
                try:
                    new.append(json.loads(line))
                except ValueError:
                    continue  # torn by a rewrite under our read; the next read sees the file whole
            stream.records = stream.records + new  # a new list: callers may hold the old one
            stream.tail = (stream.tail + data[:end])[-64:]
            stream.offset += end
            stream.key = key
            return stream.records


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (their manifest is written last), oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") and (p / CHECKPOINT_MANIFEST).is_file())


def plan_totals(plan: GrowthPlan) -> tuple[int, int]:
    """(steps, tokens) of the whole plan: what 100% progress means."""
    configs = plan.model_configs()  # once: plan.steps(k) resolves them again for each stage (O(stages^2))
    steps = tokens = 0
    for k, stage in enumerate(plan.stages):
        n = stage.tokens // (stage.batch_size * configs[k].seq_len)
        steps += n
        tokens += n * stage.batch_size * configs[k].seq_len
    return steps, tokens


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None  # absent, or being rewritten
