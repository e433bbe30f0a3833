"""Offline growth of a checkpoint on disk, tensor by tensor: what FLM-101B did between its stages (extend the
checkpoint, reload it on the next stage's layout), without ever holding the model.

    src (sharded or single-file)  --read one tensor-->  grown_tensor / grown_moment (flm/growth.py)  --write-->  dst

The grown checkpoint is a directory of safetensors files that any layout reads its shards of (DCP's
HuggingFaceStorageReader) and one process reads whole (flm/checkpoint.py):

    config.json  trainer_state.json  tokenizer/  checkpoint.json (written last)
    model-00000-of-00004.safetensors ...   parameters, split over the ranks that grew them (name i -> rank i % N)
    model-masks.safetensors                the growth masks (new coordinates at 0)
    optimizer/moments-00000-of-00004.safetensors ...   AdamW exp_avg / exp_avg_sq as "<name>.exp_avg", ...
    optimizer/step.json                    AdamW's step count (one for every parameter)

Every grown tensor has its own generator (flm/growth.py), so each rank grows its share in any order and the result
equals `grow_state` on the whole state dict, bit for bit. Peak memory of a rank: the tensors of one name's chain
through the stage's operators (old, and new per shape-changing operator) plus one moment: for the 101B plan's
largest tensor, the 100,352 x 10,240 embedding, 4.1 GB in fp32 (6144 -> 10240 wide in the 16B -> 51B growth: 2.5 GB
read + 4.1 GB written), never the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from flm.config import DEFAULT_OPERATOR_ORDER, ModelConfig, Operator
from flm.growth import GrowthStep, grown_masks, grown_moment, grown_tensor, growth_steps, param_shapes
from flm.manifest import write_manifest

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16"}


class SafetensorsWriter:
    """A safetensors file written one tensor at a time: the header (names, dtypes, shapes, offsets) is known in
    advance and written first, then each tensor's bytes in header order. Memory: the tensor being written."""

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, Sequence[int]]]):
        header, offset = {}, 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
        self._order = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
        self._next = 0
        self._file = open(path, "wb")  # noqa: SIM115 (closed by close())
        self._file.write(len(blob).to_bytes(8, "little") + blob)

    def write(self, name: str, t: torch.Tensor) -> None:
        want = self._order[self._next]
        if (name, t.dtype, tuple(t.shape)) != want:
            raise ValueError(f"safetensors stream: got {name} {t.dtype} {tuple(t.shape)}, expected {want}")
        self._file.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"safetensors stream: {len(self._order) - self._next} tensors not written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class MetadataOnceReader(dcp.FileSystemReader):
    """A DCP FileSystemReader that reads the checkpoint's `.metadata` once, not at every `dcp.load`: reading a
    tensor at a time, a 101B checkpoint saved by 192 ranks would otherwise re-read (and unpickle) an index of every
    shard of every tensor ~2,500 times (each parameter and its two AdamW moments)."""

    metadata = None
    reads = 0  # how many times the file was read

    def read_metadata(self):
        if self.metadata is None:
            self.metadata, self.reads = super().read_metadata(), self.reads + 1
        return self.metadata


class CheckpointReader:
    """One tensor at a time from a checkpoint of any format (sharded DCP, single-file, or grown)."""

    def __init__(self, directory: str | Path):
        from flm.sharded import is_sharded

        self.path = Path(directory)
        self.config = ModelConfig.model_validate_json((self.path / "config.json").read_text())
        self.sharded = is_sharded(self.path)
        self._optimizer: dict | None = None
        self._step: tuple[float | None] | None = None  # cached: (step,), read once
        if self.sharded:
            from flm.sharded import SHARDED

            self._reader = MetadataOnceReader(str(self.path / SHARDED))
        else:
            from flm.sharded import safetensors_keys

            self._files = safetensors_keys(self.path)

    def _dcp(self, state: dict) -> dict:
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        dcp.load(state, storage_reader=self._reader, planner=DefaultLoadPlanner(),
                 no_dist=True)  # a key it lacks is an error, not garbage
        return state

    def param_names(self) -> list[str]:
        return list(param_shapes(self.config))

    def tensor(self, name: str) -> torch.Tensor:
        if self.sharded:
            t = torch.empty(param_shapes(self.config)[name])
            return self._dcp({"model": {name: t}})["model"][name]
        with safe_open(self._files[name], framework="pt") as h:
            return h.get_tensor(name)

    def masks(self) -> dict[str, torch.Tensor]:
        from flm.sharded import read_masks, read_safetensors_masks

        return read_masks(self.path) if self.sharded else read_safetensors_masks(self.path)

    def moment(self, name: str, key: str) -> torch.Tensor | None:
        """AdamW's `key` of parameter `name` (None: the checkpoint has no optimizer state for it)."""
        if self.sharded:
            t = torch.empty(param_shapes(self.config)[name])
            try:
                return self._dcp({"optim": {"state": {name: {key: t}}}})["optim"]["state"][name][key]
            except (RuntimeError, KeyError, ValueError):
                return None
        state = self._single_optimizer()
        return None if state is None or name not in state else state[name].get(key)

    def step(self) -> float | None:
        """AdamW's step count (the largest, as flm/growth.py carries one count for every parameter); read once."""
        if self._step is None:
            self._step = (self._read_step(),)
        return self._step[0]

    def _read_step(self) -> float | None:
        if self.sharded:
            first = next(iter(param_shapes(self.config)))
            try:
                s = self._dcp({"optim": {"state": {first: {"step": torch.zeros(())}}}})
            except (RuntimeError, KeyError, ValueError):
                return None
            return float(s["optim"]["state"][first]["step"])
        state = self._single_optimizer()
        steps = [float(s["step"]) for s in (state or {}).values() if "step" in s]
        return max(steps) if steps else None

    def _single_optimizer(self) -> dict | None:
        """A single-file checkpoint's AdamW state by parameter name (optimizer.pt is one file: small models)."""
        if self._optimizer is None:
            from flm.checkpoint import read_optimizer
            from flm.sharded import param_names

            state = read_optimizer(self.path, self.config)
            names = param_names(self.config)
            self._optimizer = {} if state is None else {names[i]: s for i, s in state["state"].items()}
        return self._optimizer or None


def model_file(rank: int, world: int) -> str:
    return f"model-{rank:05d}-of-{world:05d}.safetensors"


def moments_file(rank: int, world: int) -> str:
    return f"optimizer/moments-{rank:05d}-of-{world:05d}.safetensors"


def grow_share(src: str | Path, tmp: str | Path, new: ModelConfig, order: Sequence[Operator], placement: str,
               seed: int, rank: int = 0, world: int = 1) -> None:
    """Rank `rank`'s share of a grown checkpoint: parameters i % world == rank, and their AdamW moments, into the
    (already created) directory `tmp`. No collectives: the caller synchronises the ranks."""
    reader = CheckpointReader(src)
    steps = growth_steps(reader.config, new, order, placement)
    final = steps[-1].after if steps else reader.config
    mine = list(param_shapes(final).items())[rank::world]
    tmp = Path(tmp)
    model = SafetensorsWriter(tmp / model_file(rank, world), [(n, torch.float32, s) for n, s in mine])
    for name, _ in mine:
        model.write(name, grown_tensor(lambda n: reader.tensor(n).float(), steps, name, seed))
    model.close()
    if reader.step() is None:
        return
    specs = [(f"{n}.{k}", torch.float32, s) for n, s in mine for k in ADAM_KEYS]
    moments = SafetensorsWriter(tmp / moments_file(rank, world), specs)
    for name, shape in mine:
        for key in ADAM_KEYS:
            m = grown_moment(lambda n, key=key: reader.moment(n, key), steps, name)
            moments.write(f"{name}.{key}", torch.zeros(shape) if m is None else m.float())
    moments.close()


def finish_growth(src: str | Path, tmp: str | Path, dst: str | Path, new: ModelConfig, order: Sequence[Operator],
                  placement: str, trainer_state: dict | None = None) -> Path:
    """After every rank's `grow_share`: the masks, config, AdamW step, tokenizer and manifest; then `tmp` renamed to
    `dst` (rank 0 alone)."""
    reader, tmp, dst = CheckpointReader(src), Path(tmp), Path(dst)
    steps: list[GrowthStep] = growth_steps(reader.config, new, order, placement)
    masks = grown_masks(reader.masks(), steps)
    if masks:
        w = SafetensorsWriter(tmp / "model-masks.safetensors", [(k, torch.float32, v.shape) for k, v in masks.items()])
        for k, v in masks.items():
            w.write(k, v.float())
        w.close()
    (tmp / "config.json").write_text((steps[-1].after if steps else reader.config).model_dump_json(indent=2))
    step = reader.step()
    if step is not None:
        (tmp / "optimizer" / "step.json").write_text(json.dumps({"step": step}))
    if trainer_state is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    if (reader.path / "tokenizer").is_dir():
        shutil.copytree(reader.path / "tokenizer", tmp / "tokenizer")
    write_manifest(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.rename(tmp, dst)
    return dst


def prepare_growth(dst: str | Path) -> Path:
    """The empty temporary directory every rank writes its share into (rank 0 creates it)."""
    dst = Path(dst)
    tmp = dst.parent / f".tmp-{dst.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "optimizer").mkdir(parents=True)
    return tmp


def grow_checkpoint(src: str | Path, dst: str | Path, new: ModelConfig,
                    order: Sequence[Operator] = DEFAULT_OPERATOR_ORDER, placement: str = "stack", seed: int = 0,
                    trainer_state: dict | None = None) -> Path:
    """The whole growth in this process (one share): `flm grow`, and the tests."""
    tmp = prepare_growth(dst)
    grow_share(src, tmp, new, order, placement, seed)
    return finish_growth(src, tmp, dst, new, order, placement, trainer_state)
